use std::process::ExitCode;

fn main() -> ExitCode {
    appevents::interfaces::cli::main()
}
