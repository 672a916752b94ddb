//! VMI text (JSON or YAML) → spec → conversion → domain XML, and the XML read back.
//! Input: the VMI text, optionally followed by a NUL byte and a pod-facts JSON file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virt_launcher_fuzz::vmi_input(data));
