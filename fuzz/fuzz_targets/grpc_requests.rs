//! Every request message of `launcher.v1` decoded from the same bytes, each re-encoded and
//! decoded again (the same message), and the VMI carried by Sync and PrepareMigrationTarget
//! taken as their handlers take it (UTF-8 text → spec) through conversion to domain XML.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use virt_launcher::api::pb;

/// Decodes `data` as `M`; a message that decodes survives its own encoding unchanged.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, m);
    Some(m)
}

/// The VMI as the Sync handler takes it (`api::decode_vmi`), then the conversion the core
/// applies to it.
fn vmi(bytes: &[u8]) {
    if let Ok(vmi) = virt_launcher::api::decode_vmi(bytes, "SyncRequest.vmi") {
        virt_launcher_fuzz::vmi_checks(&vmi, None);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<pb::Empty>(data);
    round_trip::<pb::ShutdownRequest>(data);
    round_trip::<pb::FreezeRequest>(data);
    round_trip::<pb::WatchRequest>(data);
    round_trip::<pb::MigrateRequest>(data);
    round_trip::<pb::SnapshotRequest>(data);
    if let Some(r) = round_trip::<pb::SyncRequest>(data) {
        vmi(&r.vmi);
    }
    // Field 1 is the VMI in both: the conversion ran above already.
    round_trip::<pb::PrepareMigrationTargetRequest>(data);
});
