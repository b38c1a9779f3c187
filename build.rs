//! Checks a master key embedded at build time, so a malformed one fails the build rather
//! than every start of the binary.

fn main() {
    println!("cargo:rerun-if-env-changed=CREDGATE_EMBEDDED_MASTER_KEY");
    println!("cargo:rerun-if-changed=migrations");
    if let Ok(key) = std::env::var("CREDGATE_EMBEDDED_MASTER_KEY")
        && !key.is_empty()
        && (key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        panic!("CREDGATE_EMBEDDED_MASTER_KEY must be 64 hexadecimal characters (32 bytes)");
    }
}
