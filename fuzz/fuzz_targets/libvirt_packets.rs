//! The libvirt RPC client's read side: a byte stream from the daemon's socket cut into packets
//! (`read_packet`), each decoded as the reader thread decodes it (`decode_packet`: header,
//! reply status and `remote_error`, domain events), events named as the core sees them, and
//! reply bodies decoded with the protocol's pieces (a domain, typed parameters).
#![no_main]

use libfuzzer_sys::fuzz_target;
use virt_launcher::libvirt::rpc::{self, Incoming};
use virt_launcher::libvirt::xdr::{self, Decoder, Encoder, RemoteDomain};
use virt_launcher::libvirt::DomainEvent;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    // One packet after another until the end, or the first error (which closes the
    // connection).
    while let Ok(Some(packet)) = rpc::read_packet(&mut stream) {
        // A packet read whole has a header, and framing it again gives the same bytes.
        let (h, body) = rpc::decode_header(&packet).expect("a packet read whole has a header");
        let framed = rpc::encode_packet(&h, body);
        let again = rpc::read_packet(&mut framed.as_slice()).expect("our own framing reads");
        assert_eq!(again.as_deref(), Some(&packet[..]));
        match rpc::decode_packet(&packet) {
            Err(_) => break,
            Ok(Incoming::Reply {
                result: Ok(body), ..
            }) => reply_body(body),
            Ok(Incoming::Event {
                event: Ok(Some(raw)),
                ..
            }) => {
                let event = DomainEvent::from(raw);
                let _ = event.domain();
                serde_json::to_string(&event).expect("an event serialises");
            }
            Ok(_) => {}
        }
    }
});

/// Reply bodies as the client reads them: a domain (lookups) and `{int, typed params}` (job
/// statistics). Whatever decodes survives its own encoding.
fn reply_body(body: &[u8]) {
    if let Ok(dom) = RemoteDomain::decode(&mut Decoder::new(body)) {
        let mut e = Encoder::new();
        dom.encode(&mut e);
        let bytes = e.into_bytes();
        let again = RemoteDomain::decode(&mut Decoder::new(&bytes)).expect("our domain decodes");
        assert_eq!(again, dom);
    }
    let mut d = Decoder::new(body);
    if d.i32().is_err() {
        return;
    }
    if let Ok(params) = xdr::decode_typed_params(&mut d, rpc::JOB_STATS_MAX) {
        let mut e = Encoder::new();
        xdr::encode_typed_params(&mut e, &params);
        let bytes = e.into_bytes();
        let again = xdr::decode_typed_params(&mut Decoder::new(&bytes), rpc::JOB_STATS_MAX)
            .expect("our typed parameters decode");
        // Compared encoded: a NaN is not equal to itself.
        let mut e = Encoder::new();
        xdr::encode_typed_params(&mut e, &again);
        assert_eq!(e.into_bytes(), bytes);
        let numeric = xdr::numeric_params(&params);
        assert!(numeric.len() <= params.len());
    }
}
