//! The launcher's DHCPv6 server: one datagram from the guest's side of the in-pod bridge in,
//! at most one well-formed reply out (see `virt_launcher_fuzz::dhcpv6_packet`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virt_launcher_fuzz::dhcpv6_packet(data));
