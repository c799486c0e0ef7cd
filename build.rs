//! The migrations are embedded at compile time (`refinery::embed_migrations!`), which cargo
//! does not know to watch: a new or changed migration must rebuild the crate.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
