//! The CLI's `.npy` reader on arbitrary bytes: an array or a one-line error, never a panic; an
//! array it accepts is written back and read again unchanged.
#![no_main]

// the library under the name the CLI's source uses
extern crate gn as groupnorm;

use libfuzzer_sys::fuzz_target;

/// What npy.rs takes from the CLI's argument module: its error type.
mod args {
    #[derive(Debug)]
    #[allow(dead_code)]
    pub struct UsageError(pub String);
}

// The reader lives in the binary, not the library: included by path, so the library publishes
// nothing for it.
#[allow(dead_code)]
#[path = "../../cli/src/npy.rs"]
mod npy;

fuzz_target!(|data: &[u8]| {
    match npy::parse(data) {
        Ok(array) => {
            let bytes = npy::to_bytes(&array);
            let again = npy::parse(&bytes).expect("the reader reads what the writer wrote");
            assert_eq!(npy::to_bytes(&again), bytes, "round trip changed the array");
        }
        Err(e) => assert!(
            !e.chars().any(char::is_control),
            "an error that spans lines: {e:?}"
        ),
    }
});
