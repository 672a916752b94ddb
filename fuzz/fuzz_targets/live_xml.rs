//! libvirt's domain XML as the launcher reads it back (`dumpxml` of the running domain, and a
//! single `<disk>` for hot-plug): any text gives a value or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virt_launcher::domain::live::{LiveDisk, LiveDomain};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = LiveDomain::parse(&text) {
        for disk in d.disks() {
            // What the core asks of every disk it finds.
            let _ = (disk.target_dev(), disk.bus(), disk.source_path());
            if let Some(v) = disk.volume_name() {
                assert_eq!(disk.alias().and_then(|a| a.strip_prefix("ua-")), Some(v));
            }
        }
        // Parsing is a function of the text.
        assert_eq!(LiveDomain::parse(&text).ok(), Some(d));
    }
    let _ = LiveDisk::parse(&text);
});
