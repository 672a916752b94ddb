//! `dedicatedCpuPlacement`: every vCPU pinned to a CPU of the pod's CPU set, as KubeVirt's
//! launcher does it (converter/vcpu/vcpu.go AdjustDomainForTopologyAndCPUSet and its CPU pool):
//!
//! - The pod's CPUs are grouped into the host's cores (sibling threads, in host order). A core
//!   with at least `threads` of the pod's CPUs is "full", the CPUs of the others are "fragments".
//! - Each guest core (sockets × cores, with `maxSockets` only the enabled sockets) takes
//!   `threads` CPUs: first from full cores (a full core is used up `threads` at a time and its
//!   rest becomes fragments), then `threads` fragments at a time, then any fragments left
//!   (KubeVirt's relaxed pool: no NUMA passthrough). vCPU n is pinned to the n-th CPU taken.
//! - Supplemental-pool iothreads, then the emulator thread (`isolateEmulatorThread`; a second
//!   CPU with the `alpha.kubevirt.io/EmulatorThreadCompleteToEvenParity` annotation when the
//!   vCPUs plus the supplemental iothreads are even) each take one more CPU, fragments first.
//! - Other iothreads: with `isolateEmulatorThread`, iothread 1 shares the emulator's CPU;
//!   with at least as many iothreads as vCPUs, iothread t goes to pod CPU `t mod vCPUs`; else
//!   the first vCPUs' worth of the pod's CPU set is cut into one run per iothread.
//!
//! Not enough CPUs is an error naming the field and the numbers.

use super::{err, ConvertError};
use crate::domain::CpuTune;

/// KubeVirt's annotation asking for a second emulator CPU when the pinned CPUs are even.
pub const EMULATOR_EVEN_PARITY_ANNOTATION: &str =
    "alpha.kubevirt.io/EmulatorThreadCompleteToEvenParity";

/// What the pinning needs to know about the VM.
pub struct Request {
    /// Guest cores to place: enabled sockets × cores.
    pub cores: u32,
    /// Threads per guest core.
    pub threads: u32,
    pub isolate_emulator: bool,
    pub emulator_even_parity: bool,
    /// `<iothreads>` (0: none).
    pub iothreads: u32,
    /// iothreads of the `supplementalPool` policy (they get CPUs of their own).
    pub supplemental_iothreads: u32,
}

/// KubeVirt's cell: full cores and fragments (one cell: the pool is relaxed, so cells only
/// order the CPUs, and the host order already does).
struct Pool {
    full: Vec<Vec<u32>>,
    fragments: Vec<u32>,
    threads: usize,
}

impl Pool {
    fn new(cpu_set: &[u32], siblings: &[Vec<u32>], threads: usize) -> Pool {
        let mut seen = std::collections::BTreeSet::new();
        let mut cores: Vec<Vec<u32>> = Vec::new();
        // Cores in the order of their lowest CPU (libvirt's capabilities list CPUs by id).
        let mut ids: Vec<u32> = cpu_set.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for &cpu in &ids {
            if seen.contains(&cpu) {
                continue;
            }
            let core: Vec<u32> = match siblings.iter().find(|s| s.contains(&cpu)) {
                Some(s) => {
                    let mut s = s.clone();
                    s.sort_unstable();
                    s.retain(|c| ids.binary_search(c).is_ok());
                    s
                }
                None => vec![cpu],
            };
            seen.extend(core.iter().copied());
            cores.push(core);
        }
        let (mut full, mut fragments) = (Vec::new(), Vec::new());
        for core in cores {
            if core.len() >= threads {
                full.push(core);
            } else {
                fragments.extend(core);
            }
        }
        Pool {
            full,
            fragments,
            threads,
        }
    }

    /// A guest core from a full host core.
    fn take_full_core(&mut self) -> Option<Vec<u32>> {
        let first = self.full.first_mut()?;
        let rest = first.split_off(self.threads);
        let taken = std::mem::replace(first, rest);
        if self.full[0].len() < self.threads {
            let rest = self.full.remove(0);
            self.fragments.extend(rest);
        }
        Some(taken)
    }

    /// A guest core from `threads` fragments.
    fn take_fragments(&mut self) -> Option<Vec<u32>> {
        (self.fragments.len() >= self.threads).then(|| {
            let rest = self.fragments.split_off(self.threads);
            std::mem::replace(&mut self.fragments, rest)
        })
    }

    /// One CPU: a fragment first, else the first CPU of a full core.
    fn thread(&mut self) -> Option<u32> {
        if !self.fragments.is_empty() {
            return Some(self.fragments.remove(0));
        }
        let first = self.full.first_mut()?;
        let cpu = first.remove(0);
        if first.len() < self.threads {
            let rest = self.full.remove(0);
            self.fragments.extend(rest);
        }
        Some(cpu)
    }

    /// KubeVirt's FitCores (relaxed): the CPUs for `cores` guest cores, or how many cores
    /// did not fit.
    fn fit_cores(&mut self, cores: usize) -> Result<Vec<u32>, usize> {
        let mut out = Vec::new();
        let mut left = cores;
        while left > 0 {
            match self.take_full_core() {
                Some(c) => out.extend(c),
                None => break,
            }
            left -= 1;
        }
        while left > 0 {
            match self.take_fragments() {
                Some(c) => out.extend(c),
                None => break,
            }
            left -= 1;
        }
        if left > 0 {
            // Cell-crossing fit: whatever fragments are left, thread by thread.
            let want = left * self.threads;
            let n = want.min(self.fragments.len());
            out.extend(self.fragments.drain(..n));
            let missing = want - n;
            left = missing.div_ceil(self.threads);
            if missing == 0 {
                left = 0;
            }
        }
        if left > 0 {
            Err(left)
        } else {
            Ok(out)
        }
    }
}

/// `0-3,6` for a CPU list.
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut v: Vec<u32> = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "(empty)".to_string()
    } else {
        out.join(",")
    }
}

/// The `<cputune>` for `req` on the pod's `cpu_set` (host `siblings`).
pub fn pin(req: &Request, cpu_set: &[u32], siblings: &[Vec<u32>]) -> Result<CpuTune, ConvertError> {
    let threads = req.threads.max(1) as usize;
    let vcpus = req.cores as usize * threads;
    let mut pool = Pool::new(cpu_set, siblings, threads);
    let have = format!(
        "the pod's CPU set {} has {}",
        format_cpu_list(cpu_set),
        cpu_set.len()
    );
    let vcpu_cpus = pool.fit_cores(req.cores as usize).map_err(|missing| {
        err(
            "spec.domain.cpu.dedicatedCpuPlacement",
            format!(
                "{vcpus} vCPUs ({} core(s) of {threads} thread(s)) need {vcpus} CPUs of their \
                 own, {have} ({missing} core(s) did not fit)",
                req.cores
            ),
        )
    })?;
    let mut tune = CpuTune {
        vcpupin: vcpu_cpus
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u32, c.to_string()))
            .collect(),
        ..CpuTune::default()
    };
    for t in 1..=req.supplemental_iothreads {
        let cpu = pool.thread().ok_or_else(|| {
            err(
                "spec.domain.ioThreads.supplementalPoolThreadCount",
                format!(
                    "with dedicatedCpuPlacement each of the {} supplemental iothreads needs a \
                     CPU of its own besides the {vcpus} vCPUs' ({} CPUs), {have}",
                    req.supplemental_iothreads,
                    vcpus + req.supplemental_iothreads as usize
                ),
            )
        })?;
        tune.iothreadpin.push((t, cpu.to_string()));
    }
    if req.isolate_emulator {
        let pinned = vcpus + req.supplemental_iothreads as usize;
        let n = if req.emulator_even_parity && pinned % 2 == 0 {
            2
        } else {
            1
        };
        let mut cpus = Vec::new();
        for _ in 0..n {
            let cpu = pool.thread().ok_or_else(|| {
                err(
                    "spec.domain.cpu.isolateEmulatorThread",
                    format!(
                        "the emulator thread needs {n} CPU(s) of its own besides the {pinned} \
                         pinned ones ({} CPUs), {have}",
                        pinned + n
                    ),
                )
            })?;
            cpus.push(cpu.to_string());
        }
        tune.emulatorpin = Some(cpus.join(","));
    }
    if req.iothreads > 0 && req.supplemental_iothreads == 0 {
        let mut set: Vec<u32> = cpu_set.to_vec();
        set.sort_unstable();
        set.dedup();
        if let Some(emu) = &tune.emulatorpin {
            tune.iothreadpin.push((1, emu.clone()));
        } else if req.iothreads as usize >= vcpus {
            for t in 1..=req.iothreads {
                tune.iothreadpin
                    .push((t, set[t as usize % vcpus].to_string()));
            }
        } else {
            let n = req.iothreads as usize;
            let (per, series) = (vcpus / n, vcpus % n);
            let mut cur = 0;
            for t in 1..=n {
                let len = per + usize::from(t <= series);
                let run: Vec<String> = set[cur..cur + len].iter().map(u32::to_string).collect();
                tune.iothreadpin.push((t as u32, run.join(",")));
                cur += len;
            }
        }
    }
    Ok(tune)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cores: u32, threads: u32) -> Request {
        Request {
            cores,
            threads,
            isolate_emulator: false,
            emulator_even_parity: false,
            iothreads: 0,
            supplemental_iothreads: 0,
        }
    }

    fn pins(t: &CpuTune) -> Vec<&str> {
        t.vcpupin.iter().map(|(_, c)| c.as_str()).collect()
    }

    /// KubeVirt's vcpu_test: two threads per guest core take whole host cores first.
    #[test]
    fn guest_cores_take_whole_host_cores_first() {
        // Host cores {0,4} {1,5} {2,6} {3,7}; the pod has 0,1,4,5,6.
        let sib = vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]];
        let t = pin(&req(2, 2), &[0, 1, 4, 5, 6], &sib).unwrap();
        assert_eq!(pins(&t), ["0", "4", "1", "5"]);
        // A third core has only the fragment 6 left: crossing cores is refused by count.
        let e = pin(&req(3, 2), &[0, 1, 4, 5, 6], &sib).unwrap_err();
        assert!(e.reason.contains("1 core(s) did not fit"), "{e}");
    }

    #[test]
    fn fragments_fill_what_full_cores_cannot() {
        let sib = vec![vec![0, 2], vec![1, 3]];
        // threads=2, pod 0,1,2: core {0,2} full, 1 a fragment; 2 cores need 4.
        let e = pin(&req(2, 2), &[0, 1, 2], &sib).unwrap_err();
        assert_eq!(e.field, "spec.domain.cpu.dedicatedCpuPlacement");
        assert!(e.reason.contains("the pod's CPU set 0-2 has 3"), "{e}");
        let t = pin(&req(3, 1), &[0, 1, 2], &sib).unwrap();
        assert_eq!(pins(&t), ["0", "2", "1"]);
    }

    #[test]
    fn emulator_and_iothreads() {
        let mut r = req(2, 1);
        r.isolate_emulator = true;
        r.iothreads = 1;
        let t = pin(&r, &[4, 5, 6], &[]).unwrap();
        assert_eq!(pins(&t), ["4", "5"]);
        assert_eq!(t.emulatorpin.as_deref(), Some("6"));
        assert_eq!(t.iothreadpin, [(1, "6".to_string())]);
        r.emulator_even_parity = true;
        let e = pin(&r, &[4, 5, 6], &[]).unwrap_err();
        assert_eq!(e.field, "spec.domain.cpu.isolateEmulatorThread");
        let t = pin(&r, &[4, 5, 6, 7], &[]).unwrap();
        assert_eq!(t.emulatorpin.as_deref(), Some("6,7"));
    }

    /// KubeVirt's FormatDomainIOThreadPin: runs of the CPU set, or one CPU per iothread.
    #[test]
    fn iothreads_spread_over_the_cpu_set() {
        let mut r = req(5, 1);
        r.iothreads = 2;
        let t = pin(&r, &[0, 1, 2, 3, 4], &[]).unwrap();
        assert_eq!(
            t.iothreadpin,
            [(1, "0,1,2".to_string()), (2, "3,4".to_string())]
        );
        let mut r = req(2, 1);
        r.iothreads = 3;
        let t = pin(&r, &[0, 1], &[]).unwrap();
        assert_eq!(
            t.iothreadpin,
            [(1, "1".into()), (2, "0".into()), (3, "1".into())]
        );
    }

    #[test]
    fn cpu_lists_are_compact() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[]), "(empty)");
    }
}
