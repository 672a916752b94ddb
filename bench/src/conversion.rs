//! Benchmark: conversion of a VMI with 1 to 256 disks, in process.

use crate::*;

/// The conversion of the [`testkit::vmi::mixed_disks`] VMI with `disks` disks, in µs per call
/// (one sample per batch of calls).
pub struct Conversion {
    pub disks: usize,
    pub convert_us: Vec<f64>,
    pub convert_and_xml_us: Vec<f64>,
    pub xml_bytes: usize,
}

impl Conversion {
    /// Measures it (quick: fewer, shorter batches).
    pub fn measure(disks: usize, quick: bool) -> Result<Conversion> {
        let vmi = spec::from_str(&testkit::vmi::mixed_disks(disks).to_string(), "bench")?;
        let facts = PodFacts::defaults(&vmi);
        let convert_us = us_per_call(quick, || {
            let d = convert::convert(&vmi, &facts).expect("bench VMI converts");
            std::hint::black_box(d);
        });
        let convert_and_xml_us = us_per_call(quick, || {
            let d = convert::convert(&vmi, &facts).expect("bench VMI converts");
            std::hint::black_box(d.to_xml());
        });
        let xml_bytes = convert::convert(&vmi, &facts)
            .context("convert the bench VMI")?
            .to_xml()
            .len();
        Ok(Conversion {
            disks,
            convert_us,
            convert_and_xml_us,
            xml_bytes,
        })
    }

    /// The row of the results (medians).
    pub fn row(&self) -> ConversionRow {
        let med = |v: &[f64]| Stat::of(v).map_or(0.0, |s| s.median);
        ConversionRow {
            disks: self.disks,
            convert_us: med(&self.convert_us),
            convert_and_xml_us: med(&self.convert_and_xml_us),
            xml_bytes: self.xml_bytes,
        }
    }
}

pub(crate) fn bench_conversion(ctx: &mut Ctx) -> Result<()> {
    let mut samples: Vec<(usize, Vec<f64>)> = Vec::new();
    for n in CONVERSION_DISKS {
        check_interrupt()?;
        let c = Conversion::measure(n, ctx.opts.quick)?;
        let row = c.row();
        progress(&format!(
            "conversion, {n} disks: {:.1} µs (+ XML: {:.1} µs)",
            row.convert_us, row.convert_and_xml_us
        ));
        ctx.conversion.push(row);
        samples.push((n, c.convert_and_xml_us));
    }
    let does = "VMI → domain model → XML text, in process (one sample per batch of calls)";
    let names: [(&'static str, &'static str, Option<Goal>); 4] = [
        ("convert.disks_1", "conversion, 1 disk", None),
        (
            "convert.disks_13",
            "conversion, 13 disks",
            Some(Goal::Below(1000.0)),
        ),
        ("convert.disks_64", "conversion, 64 disks", None),
        ("convert.disks_256", "conversion, 256 disks", None),
    ];
    for ((id, name, goal), (_, s)) in names.into_iter().zip(&samples) {
        ctx.figure(id, name, "µs", s, does, None, goal);
    }
    Ok(())
}

/// Time of one call in µs, one sample per batch: warm-up, then batches sized to ~20 ms
/// (5 ms when quick).
pub(crate) fn us_per_call(quick: bool, f: impl Fn()) -> Vec<f64> {
    let (batch_time, batches) = if quick {
        (Duration::from_millis(5), 5)
    } else {
        (Duration::from_millis(20), 15)
    };
    for _ in 0..10 {
        f();
    }
    let t = Instant::now();
    f();
    let one = t.elapsed().max(Duration::from_nanos(100));
    let per_batch = (batch_time.as_nanos() / one.as_nanos()).clamp(1, 100_000) as u32;
    (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            (t.elapsed() / per_batch).as_secs_f64() * 1e6
        })
        .collect()
}
