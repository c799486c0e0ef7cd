use std::process::ExitCode;

fn main() -> ExitCode {
    appevents::cli::main()
}
