//! checkpointctl: vdc-compatible checkpoint commands and offline dm-bow log tools.
fn main() {
    eprintln!("checkpointctl: not built yet (see the open issues)");
    std::process::exit(1);
}
