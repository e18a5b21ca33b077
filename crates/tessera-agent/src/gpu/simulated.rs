//! Simulated GPUs: a spec such as `8xH100-80GB,2xA100-40GB`, telemetry that follows load, and
//! fault injection. Everything is deterministic: the "noise" comes from a hash of the GPU index
//! and a sample counter.

use super::{GpuError, GpuEvent, GpuEventKind, GpuInfo, GpuSample, GpuSource, MemoryRepair};

/// Most simulated GPUs one node may have (catches typos such as `800xH100-80GB`).
const MAX_GPUS: u32 = 256;
const EXAMPLE: &str = "8xH100-80GB";

/// One `COUNTxMODEL-MEMORY` group of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedSpec {
    pub count: u32,
    /// The model as written, e.g. `H100`.
    pub model: String,
    pub memory_mib: u64,
}

impl SimulatedSpec {
    /// The name the GPUs report, e.g. `NVIDIA H100 80GB (simulated)`.
    pub fn model_name(&self) -> String {
        let gb = self.memory_mib.div_ceil(1024);
        format!("NVIDIA {} {gb}GB (simulated)", self.model)
    }
}

/// Parses `COUNTxMODEL-MEMORY[,COUNTxMODEL-MEMORY...]`, e.g. `8xH100-80GB,2xA100-40GB`.
/// MEMORY is a whole number with a unit: `GB`/`GiB`/`G` (GiB, as GPU memory sizes are meant)
/// or `MB`/`MiB`/`M`; units are case-insensitive. MODEL may itself contain dashes
/// (`A100-SXM4-80GB`).
pub fn parse_spec(spec: &str) -> Result<Vec<SimulatedSpec>, GpuError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(GpuError::Spec(format!("the spec is empty; expected COUNTxMODEL-MEMORY like {EXAMPLE}")));
    }
    let mut groups = Vec::new();
    let mut total: u64 = 0;
    for part in spec.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(GpuError::Spec(format!("'{spec}' has an empty entry between commas")));
        }
        let group = parse_group(part)?;
        total += u64::from(group.count);
        if total > u64::from(MAX_GPUS) {
            return Err(GpuError::Spec(format!("'{spec}' asks for {total} GPUs; a node has at most {MAX_GPUS}")));
        }
        groups.push(group);
    }
    Ok(groups)
}

fn parse_group(part: &str) -> Result<SimulatedSpec, GpuError> {
    let shape = || GpuError::Spec(format!("'{part}' is not COUNTxMODEL-MEMORY like {EXAMPLE}"));
    let digits = part.find(|c: char| !c.is_ascii_digit()).ok_or_else(shape)?;
    if digits == 0 || !part[digits..].starts_with(['x', 'X']) {
        return Err(shape());
    }
    let count: u32 = part[..digits]
        .parse()
        .map_err(|_| GpuError::Spec(format!("'{part}': count '{}' is too large", &part[..digits])))?;
    if count == 0 {
        return Err(GpuError::Spec(format!("'{part}': count must be at least 1")));
    }
    let (model, memory) = part[digits + 1..].rsplit_once('-').ok_or_else(shape)?;
    if model.is_empty() || memory.is_empty() {
        return Err(shape());
    }
    if let Some(bad) = model.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(GpuError::Spec(format!(
            "'{part}': model '{model}' may only contain letters, digits, '-', '_' and '.', not {bad:?}"
        )));
    }
    let memory_mib =
        parse_memory(memory).map_err(|why| GpuError::Spec(format!("'{part}': memory '{memory}' {why}")))?;
    Ok(SimulatedSpec { count, model: model.to_string(), memory_mib })
}

fn parse_memory(memory: &str) -> Result<u64, &'static str> {
    let digits = memory.find(|c: char| !c.is_ascii_digit()).unwrap_or(memory.len());
    if digits == 0 {
        return Err("must be a whole number with a unit, like 80GB");
    }
    let amount: u64 = memory[..digits].parse().map_err(|_| "is too large")?;
    let unit = &memory[digits..];
    let mib_per_unit = match unit.to_ascii_lowercase().as_str() {
        "gb" | "gib" | "g" => 1024,
        "mb" | "mib" | "m" => 1,
        "" => return Err("needs a unit: GB or GiB (or MiB)"),
        _ => return Err("has an unknown unit; use GB, GiB or MiB"),
    };
    let mib = amount.checked_mul(mib_per_unit).ok_or("is too large")?;
    if mib == 0 {
        return Err("must be more than 0");
    }
    if mib > 16 * 1024 * 1024 {
        return Err("is more than 16 TiB");
    }
    Ok(mib)
}

/// What a simulated model looks like under load.
#[derive(Debug, Clone, Copy)]
struct Profile {
    power_limit_w: f64,
    idle_sm_mhz: u32,
    max_sm_mhz: u32,
    /// Ampere and newer remap rows; older GPUs retire pages.
    row_remapping: bool,
}

fn profile(model: &str) -> Profile {
    let m = model.to_ascii_uppercase();
    let p = |power_limit_w, idle_sm_mhz, max_sm_mhz, row_remapping| Profile {
        power_limit_w,
        idle_sm_mhz,
        max_sm_mhz,
        row_remapping,
    };
    // Longer names first: GH200 before H200, A100 before A10, L40 before L4.
    if m.contains("B200") {
        p(1000.0, 345, 1965, true)
    } else if m.contains("GH200") {
        p(900.0, 345, 1980, true)
    } else if m.contains("H200") || m.contains("H100") {
        p(700.0, 345, 1980, true)
    } else if m.contains("A100") {
        p(400.0, 210, 1410, true)
    } else if m.contains("L40") {
        p(350.0, 210, 2520, true)
    } else if m.contains("A10") {
        p(150.0, 210, 1695, true)
    } else if m.contains("L4") {
        p(72.0, 210, 2040, true)
    } else if m.contains("V100") {
        p(300.0, 135, 1530, false)
    } else if m.contains("T4") {
        p(70.0, 300, 1590, false)
    } else {
        p(300.0, 210, 1500, true)
    }
}

#[derive(Debug)]
struct SimGpu {
    profile: Profile,
    busy: bool,
    ecc_corrected: u64,
    ecc_uncorrected: u64,
    repair: MemoryRepair,
    xid_errors: u64,
    last_xid: Option<u64>,
}

/// Simulated GPUs (see the module docs).
#[derive(Debug)]
pub struct Simulated {
    inventory: Vec<GpuInfo>,
    gpus: Vec<SimGpu>,
    events: Vec<GpuEvent>,
    tick: u64,
}

impl Simulated {
    /// GPUs from `spec` (see [`parse_spec`]); `seed` (the node name) goes into the uuids,
    /// `GPU-SIM-<seed>-<index>`, so that they are the same on every start of the same node.
    pub fn new(spec: &str, seed: &str) -> Result<Self, GpuError> {
        let groups = parse_spec(spec)?;
        let seed = uuid_seed(seed);
        let mut inventory = Vec::new();
        let mut gpus = Vec::new();
        let mut index: u32 = 0;
        for group in &groups {
            let profile = profile(&group.model);
            for _ in 0..group.count {
                inventory.push(GpuInfo {
                    index,
                    uuid: format!("GPU-SIM-{seed}-{index}"),
                    model: group.model_name(),
                    memory_mib: group.memory_mib,
                });
                let repair = if profile.row_remapping {
                    MemoryRepair::RemappedRows { correctable: 0, uncorrectable: 0, pending: false, failed: false }
                } else {
                    MemoryRepair::RetiredPages { sbe: 0, dbe: 0, pending: false }
                };
                gpus.push(SimGpu {
                    profile,
                    busy: false,
                    ecc_corrected: 0,
                    ecc_uncorrected: 0,
                    repair,
                    xid_errors: 0,
                    last_xid: None,
                });
                index += 1;
            }
        }
        Ok(Self { inventory, gpus, events: Vec::new(), tick: 0 })
    }

    /// Raises a fault on GPU `index`, as the hardware would: an XID counts in `xid_errors` and
    /// becomes `last_xid`; an uncorrectable ECC error counts in `ecc_uncorrected` and retires a
    /// page (or remaps a row, pending a reset). Either way an event is queued for
    /// [`GpuSource::take_events`].
    pub fn inject(&mut self, index: u32, kind: GpuEventKind) -> Result<(), GpuError> {
        let gpu = self.gpus.get_mut(index as usize).ok_or(GpuError::UnknownGpu(index))?;
        match kind {
            GpuEventKind::Xid(xid) => {
                gpu.xid_errors += 1;
                gpu.last_xid = Some(xid);
            }
            GpuEventKind::EccUncorrectable => {
                gpu.ecc_uncorrected += 1;
                match &mut gpu.repair {
                    MemoryRepair::RetiredPages { dbe, pending, .. } => {
                        *dbe += 1;
                        *pending = true;
                    }
                    MemoryRepair::RemappedRows { uncorrectable, pending, .. } => {
                        *uncorrectable += 1;
                        *pending = true;
                    }
                }
            }
        }
        tracing::info!(gpu = index, ?kind, "injected a fault into a simulated GPU");
        self.events.push(GpuEvent { index, kind });
        Ok(())
    }
}

impl GpuSource for Simulated {
    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        self.tick = self.tick.wrapping_add(1);
        let tick = self.tick;
        self.inventory.iter().zip(&self.gpus).map(|(info, gpu)| sample_one(info, gpu, tick)).collect()
    }

    fn simulated(&self) -> bool {
        true
    }

    fn set_busy(&mut self, index: u32, busy: bool) {
        match self.gpus.get_mut(index as usize) {
            Some(gpu) => gpu.busy = busy,
            None => tracing::warn!(gpu = index, "set_busy for a simulated GPU that does not exist"),
        }
    }

    fn take_events(&mut self) -> Vec<GpuEvent> {
        std::mem::take(&mut self.events)
    }

    fn inject(&mut self, index: u32, kind: GpuEventKind) -> Result<(), GpuError> {
        Simulated::inject(self, index, kind)
    }
}

fn sample_one(info: &GpuInfo, gpu: &SimGpu, tick: u64) -> GpuSample {
    // `jitter(salt, n)` is in 0..=n, different for every GPU, sample and quantity.
    let jitter = |salt: u64, n: u64| mix(u64::from(info.index), tick, salt) % (n + 1);
    let total = info.memory_mib;
    let limit = gpu.profile.power_limit_w;
    let (util, mem_util, used, temp, power, clock) = if gpu.busy {
        (
            93 + jitter(1, 5) as u32,
            55 + jitter(2, 20) as u32,
            total * (85 + jitter(3, 7)) / 100,
            68 + jitter(4, 8) as u32,
            limit * (80 + jitter(5, 15)) as f64 / 100.0,
            gpu.profile.max_sm_mhz - jitter(6, 60) as u32,
        )
    } else {
        (
            jitter(1, 1) as u32,
            0,
            (total / 200 + jitter(3, 16)).min(total),
            30 + jitter(4, 5) as u32,
            (limit * 0.10 + jitter(5, 10) as f64).min(limit),
            gpu.profile.idle_sm_mhz,
        )
    };
    GpuSample {
        index: info.index,
        uuid: info.uuid.clone(),
        model: info.model.clone(),
        gpu_util_pct: util,
        mem_util_pct: mem_util,
        mem_used_mib: used,
        mem_total_mib: total,
        temperature_c: temp,
        power_w: power,
        power_limit_w: limit,
        sm_clock_mhz: clock,
        ecc_corrected: gpu.ecc_corrected,
        ecc_uncorrected: gpu.ecc_uncorrected,
        retired_pages: Some(gpu.repair.total()),
        memory_repair: Some(gpu.repair),
        xid_errors: gpu.xid_errors,
        last_xid: gpu.last_xid,
        // Simulated GPUs run no processes of their own to report.
        processes: None,
    }
}

/// splitmix64 over the three inputs: cheap, deterministic, well spread.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(21) ^ c.rotate_left(42);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The node name made uuid-friendly: lower-case letters, digits and single dashes, at most 40
/// characters. When that changed the name, an FNV-1a hash of the original keeps names that
/// differ only in punctuation apart.
fn uuid_seed(seed: &str) -> String {
    let mut out = String::new();
    for c in seed.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(40);
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() || out != seed {
        let hash = seed.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        if out.is_empty() {
            out = format!("{hash:08x}");
        } else {
            out = format!("{out}-{hash:08x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_error(spec: &str) -> String {
        match parse_spec(spec) {
            Err(GpuError::Spec(message)) => message,
            Err(other) => panic!("{spec}: expected a spec error, got {other}"),
            Ok(groups) => panic!("{spec}: expected a spec error, got {groups:?}"),
        }
    }

    #[test]
    fn gpu_spec_parses_groups_and_units() {
        let groups = parse_spec(" 8xH100-80GB , 2XA100-SXM4-40gib,1xT4-16G,1xL4-23034MiB ").unwrap();
        assert_eq!(
            groups,
            vec![
                SimulatedSpec { count: 8, model: "H100".into(), memory_mib: 80 * 1024 },
                SimulatedSpec { count: 2, model: "A100-SXM4".into(), memory_mib: 40 * 1024 },
                SimulatedSpec { count: 1, model: "T4".into(), memory_mib: 16 * 1024 },
                SimulatedSpec { count: 1, model: "L4".into(), memory_mib: 23034 },
            ]
        );
        assert_eq!(groups[0].model_name(), "NVIDIA H100 80GB (simulated)");
        assert_eq!(groups[3].model_name(), "NVIDIA L4 23GB (simulated)");
    }

    #[test]
    fn gpu_spec_errors_name_the_bad_part() {
        assert_eq!(spec_error("8xH100"), "'8xH100' is not COUNTxMODEL-MEMORY like 8xH100-80GB");
        assert!(spec_error("8xH100-80GB,H100-80GB").contains("'H100-80GB' is not COUNTxMODEL-MEMORY"));
        assert!(spec_error("8H100-80GB").contains("'8H100-80GB' is not COUNTxMODEL-MEMORY"));
        assert!(spec_error("8x-80GB").contains("'8x-80GB' is not"));
        assert!(spec_error("8xH100-").contains("'8xH100-' is not"));
        assert!(spec_error("0xH100-80GB").contains("count must be at least 1"));
        assert!(spec_error("99999999999xH100-80GB").contains("too large"));
        let unit = spec_error("8xH100-80");
        assert!(unit.contains("'8xH100-80'") && unit.contains("needs a unit"), "{unit}");
        let unit = spec_error("8xH100-80TB");
        assert!(unit.contains("unknown unit"), "{unit}");
        assert!(spec_error("8xH100-GB").contains("whole number"));
        assert!(spec_error("8xH100-0GB").contains("more than 0"));
        assert!(spec_error("8xH1 00-80GB").contains("model 'H1 00'"));
        assert!(spec_error("8xH100-80GB,,1xT4-16GB").contains("empty entry"));
        assert!(spec_error("   ").contains("empty"));
        assert!(spec_error("200xH100-80GB,100xA100-40GB").contains("at most 256"));
    }

    #[test]
    fn gpu_simulated_inventory_says_it_is_simulated() {
        let sim = Simulated::new("2xH100-80GB,1xA100-40GB", "node-a").unwrap();
        let inventory = sim.inventory();
        assert_eq!(inventory.len(), 3);
        assert_eq!(
            inventory[0],
            GpuInfo {
                index: 0,
                uuid: "GPU-SIM-node-a-0".into(),
                model: "NVIDIA H100 80GB (simulated)".into(),
                memory_mib: 81920
            }
        );
        assert_eq!(inventory[2].index, 2);
        assert_eq!(inventory[2].uuid, "GPU-SIM-node-a-2");
        assert_eq!(inventory[2].model, "NVIDIA A100 40GB (simulated)");
        assert!(sim.simulated());
        // Same seed, same uuids; another node, other uuids.
        let again = Simulated::new("2xH100-80GB,1xA100-40GB", "node-a").unwrap();
        assert_eq!(again.inventory(), inventory);
        let other = Simulated::new("2xH100-80GB,1xA100-40GB", "node-b").unwrap();
        assert_ne!(other.inventory()[0].uuid, inventory[0].uuid);
    }

    #[test]
    fn gpu_uuid_seed_is_hostname_ish() {
        assert_eq!(uuid_seed("node-a"), "node-a");
        assert_eq!(uuid_seed("gpu7"), "gpu7");
        let dotted = uuid_seed("Ip-10-0-1-5.EC2.internal");
        assert!(dotted.starts_with("ip-10-0-1-5-ec2-internal-"), "{dotted}");
        assert_ne!(uuid_seed("a.b"), uuid_seed("a_b"));
        assert_eq!(uuid_seed("a.b"), uuid_seed("a.b"));
        assert!(!uuid_seed("").is_empty());
        assert!(uuid_seed(&"x".repeat(100)).len() <= 50);
        assert!(uuid_seed("ünïcode host").chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn gpu_simulated_telemetry_follows_load() {
        let mut sim = Simulated::new("4xH100-80GB", "node-a").unwrap();
        sim.set_busy(1, true);
        sim.set_busy(3, true);
        sim.set_busy(3, false);
        sim.set_busy(99, true); // ignored
        for _ in 0..200 {
            let samples = sim.sample();
            assert_eq!(samples.len(), 4);
            for s in &samples {
                assert_eq!(s.mem_total_mib, 81920);
                assert!(s.mem_used_mib <= s.mem_total_mib);
                assert!(s.power_w <= s.power_limit_w);
                assert_eq!(s.power_limit_w, 700.0);
                if s.index == 1 {
                    assert!((93..=98).contains(&s.gpu_util_pct), "{s:?}");
                    assert!(s.mem_util_pct >= 50, "{s:?}");
                    assert!(s.mem_used_mib > s.mem_total_mib * 8 / 10, "{s:?}");
                    assert!(s.temperature_c >= 65, "{s:?}");
                    assert!(s.power_w > 0.75 * s.power_limit_w, "{s:?}");
                    assert!(s.sm_clock_mhz > 1800, "{s:?}");
                } else {
                    assert!(s.gpu_util_pct <= 2, "{s:?}");
                    assert_eq!(s.mem_util_pct, 0, "{s:?}");
                    assert!(s.mem_used_mib < s.mem_total_mib / 20, "{s:?}");
                    assert!(s.temperature_c <= 40, "{s:?}");
                    assert!(s.power_w < 0.2 * s.power_limit_w, "{s:?}");
                    assert!(s.sm_clock_mhz < 500, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn gpu_simulated_telemetry_varies_but_is_deterministic() {
        let mut a = Simulated::new("2xA100-40GB", "n").unwrap();
        let mut b = Simulated::new("2xA100-40GB", "n").unwrap();
        a.set_busy(0, true);
        b.set_busy(0, true);
        let a_runs: Vec<_> = (0..20).map(|_| a.sample()).collect();
        let b_runs: Vec<_> = (0..20).map(|_| b.sample()).collect();
        assert_eq!(a_runs, b_runs);
        let utils: std::collections::HashSet<u32> = a_runs.iter().map(|s| s[0].gpu_util_pct).collect();
        assert!(utils.len() > 1, "busy utilisation never varies: {utils:?}");
        let temps: std::collections::HashSet<u32> = a_runs.iter().map(|s| s[1].temperature_c).collect();
        assert!(temps.len() > 1, "idle temperature never varies: {temps:?}");
    }

    #[test]
    fn gpu_injection_counts_and_queues_events() {
        let mut sim = Simulated::new("2xH100-80GB,1xV100-16GB", "node-a").unwrap();
        assert!(sim.take_events().is_empty());
        let before = sim.sample();
        assert!(before.iter().all(|s| s.xid_errors == 0 && s.last_xid.is_none() && s.ecc_uncorrected == 0));
        assert!(before.iter().all(|s| s.retired_pages == Some(0)));

        sim.inject(1, GpuEventKind::Xid(48)).unwrap();
        sim.inject(1, GpuEventKind::Xid(79)).unwrap();
        sim.inject(0, GpuEventKind::EccUncorrectable).unwrap();
        sim.inject(2, GpuEventKind::EccUncorrectable).unwrap();
        assert!(matches!(sim.inject(3, GpuEventKind::Xid(13)), Err(GpuError::UnknownGpu(3))));

        assert_eq!(
            sim.take_events(),
            vec![
                GpuEvent { index: 1, kind: GpuEventKind::Xid(48) },
                GpuEvent { index: 1, kind: GpuEventKind::Xid(79) },
                GpuEvent { index: 0, kind: GpuEventKind::EccUncorrectable },
                GpuEvent { index: 2, kind: GpuEventKind::EccUncorrectable },
            ]
        );
        assert!(sim.take_events().is_empty(), "events are handed out once");

        let after = sim.sample();
        assert_eq!((after[1].xid_errors, after[1].last_xid), (2, Some(79)));
        assert_eq!((after[0].xid_errors, after[0].last_xid), (0, None));
        assert_eq!(after[0].ecc_uncorrected, 1);
        assert_eq!(after[0].retired_pages, Some(1));
        assert_eq!(
            after[0].memory_repair,
            Some(MemoryRepair::RemappedRows { correctable: 0, uncorrectable: 1, pending: true, failed: false })
        );
        // A V100 retires pages instead of remapping rows.
        assert_eq!(after[2].memory_repair, Some(MemoryRepair::RetiredPages { sbe: 0, dbe: 1, pending: true }));
        assert_eq!(after[1].ecc_uncorrected, 0);
    }
}
