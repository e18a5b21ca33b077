//! GPUs: inventory, 1 Hz telemetry and XID / ECC events, from NVML or from simulated GPUs.
//!
//! - [`Nvml`]: real GPUs through `nvml-wrapper` (libnvidia-ml is loaded at run time, so the agent
//!   binary runs on machines without a driver and [`open`] reports [`GpuError::NoDriver`]). Every
//!   NVML query that odd hardware may not support degrades to a default instead of failing the
//!   sample; XID and double-bit ECC events arrive on a dedicated thread.
//! - [`Simulated`]: GPUs described by a spec such as `8xH100-80GB,2xA100-40GB`, for laptops, CI
//!   and load tests. They say so everywhere: model names end in `(simulated)`, uuids start with
//!   `GPU-SIM-`, and [`GpuSource::simulated`] is true. Their telemetry follows
//!   [`GpuSource::set_busy`], and [`Simulated::inject`] raises XID / ECC faults for tests.
//! - [`prometheus`]: the samples as Prometheus text with dcgm-exporter's metric and label names.

mod nvml;
mod prometheus;
mod simulated;

use serde::{Deserialize, Serialize};

pub use nvml::Nvml;
pub use prometheus::prometheus;
pub use simulated::{Simulated, SimulatedSpec, parse_spec};

/// One GPU as the node reports it to the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML index (the `gpu` label of dcgm-exporter, the number in `CUDA_VISIBLE_DEVICES`).
    pub index: u32,
    /// `GPU-…` uuid; simulated GPUs have `GPU-SIM-<seed>-<index>`.
    pub uuid: String,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`; simulated GPUs end in `(simulated)`.
    pub model: String,
    /// Total framebuffer memory in MiB.
    pub memory_mib: u64,
}

/// How a GPU repairs its memory after ECC errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRepair {
    /// Dynamic page retirement (Kepler to Turing).
    RetiredPages {
        /// Pages retired after multiple single-bit errors.
        sbe: u64,
        /// Pages retired after a double-bit error.
        dbe: u64,
        /// Some pages wait for a GPU reset / reboot to be retired.
        pending: bool,
    },
    /// Row remapping (Ampere and newer: A100, H100, ...).
    RemappedRows {
        /// Rows remapped after correctable errors.
        correctable: u64,
        /// Rows remapped after uncorrectable errors.
        uncorrectable: u64,
        /// A remap waits for a GPU reset.
        pending: bool,
        /// A remap failed: the GPU should be taken out of service.
        failed: bool,
    },
}

impl MemoryRepair {
    /// Retired pages or remapped rows, all causes together.
    pub fn total(&self) -> u64 {
        match *self {
            MemoryRepair::RetiredPages { sbe, dbe, .. } => sbe.saturating_add(dbe),
            MemoryRepair::RemappedRows { correctable, uncorrectable, .. } => correctable.saturating_add(uncorrectable),
        }
    }
}

/// One GPU's telemetry at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    /// Same as [`GpuInfo::model`] (the `modelName` label).
    pub model: String,
    /// Percent of time a kernel was running (DCGM_FI_DEV_GPU_UTIL).
    pub gpu_util_pct: u32,
    /// Percent of time device memory was read or written (DCGM_FI_DEV_MEM_COPY_UTIL).
    pub mem_util_pct: u32,
    pub mem_used_mib: u64,
    pub mem_total_mib: u64,
    pub temperature_c: u32,
    pub power_w: f64,
    /// Enforced power limit.
    pub power_limit_w: f64,
    pub sm_clock_mhz: u32,
    /// Volatile (since driver load) corrected ECC errors; 0 where ECC is off or unsupported.
    pub ecc_corrected: u64,
    /// Volatile uncorrected ECC errors; 0 where ECC is off or unsupported.
    pub ecc_uncorrected: u64,
    /// Retired pages or remapped rows (see [`MemoryRepair::total`]), where the GPU has them.
    pub retired_pages: Option<u64>,
    /// The detail behind `retired_pages`.
    pub memory_repair: Option<MemoryRepair>,
    /// XID errors seen since this source started.
    pub xid_errors: u64,
    /// The last XID seen since this source started.
    pub last_xid: Option<u64>,
    /// Compute processes on the GPU with their memory in MiB: refreshed at most every
    /// [`PROCESS_QUERY_INTERVAL`] (an expensive NVML call), None in samples between refreshes
    /// and on sources that cannot tell.
    pub processes: Option<Vec<GpuProcess>>,
}

/// How often the per-process query runs.
pub const PROCESS_QUERY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// A process using a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Process id (in the host's namespace).
    pub pid: u32,
    /// GPU memory it holds, MiB (0 when the driver cannot say).
    pub used_mib: u64,
}

/// Something bad that happened to a GPU, seen since the last [`GpuSource::take_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuEvent {
    pub index: u32,
    pub kind: GpuEventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuEventKind {
    /// A critical XID error with its number (NVML reports 999 for an unknown XID).
    Xid(u64),
    /// An uncorrectable (double-bit) ECC error.
    EccUncorrectable,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// NVML could not be initialised: no driver, no library, or no access to the driver.
    #[error("no usable NVIDIA driver: {0}")]
    NoDriver(String),
    /// An NVML call that the GPU layer cannot do without failed.
    #[error("NVML call {call} failed: {source}")]
    Nvml {
        call: &'static str,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// A `--simulate` spec that does not parse.
    #[error("bad simulated GPU spec: {0}")]
    Spec(String),
    #[error("no GPU with index {0} on this node")]
    UnknownGpu(u32),
    /// Fault injection was asked of real GPUs.
    #[error("faults can only be injected into simulated GPUs")]
    NotSimulated,
}

/// Where the agent's GPU inventory and telemetry come from.
pub trait GpuSource: Send {
    /// The GPUs, in index order. Fixed for the life of the source.
    fn inventory(&self) -> &[GpuInfo];
    /// Current telemetry of every GPU that can be read now (a GPU that fell off the bus is
    /// left out). Fast: meant to be called about once a second.
    fn sample(&mut self) -> Vec<GpuSample>;
    /// True for simulated GPUs.
    fn simulated(&self) -> bool;
    /// Tells the source whether a shard runs on GPU `index`. Simulated GPUs' telemetry follows
    /// it; NVML ignores it.
    fn set_busy(&mut self, index: u32, busy: bool);
    /// XID and uncorrectable ECC events seen since the last call, oldest first.
    fn take_events(&mut self) -> Vec<GpuEvent>;
    /// Raises a fault on a simulated GPU (see [`Simulated::inject`]); real GPUs refuse with
    /// [`GpuError::NotSimulated`].
    fn inject(&mut self, index: u32, kind: GpuEventKind) -> Result<(), GpuError> {
        let _ = (index, kind);
        Err(GpuError::NotSimulated)
    }
}

/// Opens the node's GPUs: simulated ones when `simulate` holds a spec (e.g. `8xH100-80GB`),
/// otherwise the real ones through NVML. `seed` (the node name) makes simulated uuids unique
/// per node and stable across restarts.
pub fn open(simulate: Option<&str>, seed: &str) -> Result<Box<dyn GpuSource>, GpuError> {
    match simulate {
        Some(spec) => Ok(Box::new(Simulated::new(spec, seed)?)),
        None => Ok(Box::new(Nvml::init()?)),
    }
}

/// A node without GPUs (no driver and nothing simulated): empty inventory, no samples, no events.
pub fn none() -> Box<dyn GpuSource> {
    Box::new(NoGpus)
}

#[derive(Debug)]
struct NoGpus;

impl GpuSource for NoGpus {
    fn inventory(&self) -> &[GpuInfo] {
        &[]
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        Vec::new()
    }

    fn simulated(&self) -> bool {
        false
    }

    fn set_busy(&mut self, _index: u32, _busy: bool) {}

    fn take_events(&mut self) -> Vec<GpuEvent> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn gpu_sources_are_send() {
        assert_send::<Nvml>();
        assert_send::<Simulated>();
        assert_send::<Box<dyn GpuSource>>();
    }

    #[test]
    fn gpu_open_simulated() {
        let mut source = open(Some("2xH100-80GB"), "node-a").expect("simulated GPUs open");
        assert!(source.simulated());
        assert_eq!(source.inventory().len(), 2);
        assert_eq!(source.sample().len(), 2);
        source.inject(1, GpuEventKind::Xid(79)).expect("simulated GPUs take injected faults");
        assert_eq!(source.take_events(), vec![GpuEvent { index: 1, kind: GpuEventKind::Xid(79) }]);
    }

    #[test]
    fn gpu_open_simulated_bad_spec_is_an_error() {
        match open(Some("8xH100"), "node-a") {
            Err(GpuError::Spec(message)) => assert!(message.contains("'8xH100'"), "{message}"),
            Err(other) => panic!("expected a spec error, got {other}"),
            Ok(_) => panic!("expected a spec error"),
        }
    }

    /// This machine has no NVIDIA driver: NVML must fail cleanly, with a message that says what
    /// is missing. On a GPU host the same test checks that NVML opens and samples.
    #[test]
    fn gpu_open_nvml_without_driver_is_no_driver() {
        let have_driver = std::path::Path::new("/dev/nvidiactl").exists();
        match open(None, "node-a") {
            Err(GpuError::NoDriver(message)) => {
                eprintln!("{message}");
                assert!(!have_driver, "NVML failed on a host with a driver: {message}");
                assert!(message.contains("libnvidia-ml") || message.contains("driver"), "{message}");
            }
            Err(other) => panic!("expected NoDriver, got {other}"),
            Ok(mut source) => {
                // A GPU host: check that NVML reads sensible values.
                assert!(have_driver, "NVML opened on a host without /dev/nvidiactl");
                assert!(!source.simulated());
                let inventory = source.inventory().to_vec();
                eprintln!("inventory: {inventory:#?}");
                assert!(!inventory.is_empty(), "NVML works but lists no GPU");
                for gpu in &inventory {
                    assert!(gpu.uuid.starts_with("GPU-") && !gpu.uuid.starts_with("GPU-SIM-"), "{gpu:?}");
                    assert!(!gpu.model.contains("simulated") && gpu.memory_mib > 0, "{gpu:?}");
                }
                let samples = source.sample();
                eprintln!("samples: {samples:#?}");
                assert_eq!(samples.len(), inventory.len(), "some GPU could not be sampled");
                for s in &samples {
                    assert!(s.mem_total_mib > 0 && s.mem_used_mib <= s.mem_total_mib, "{s:?}");
                    assert!(s.temperature_c > 0 && s.temperature_c < 120, "{s:?}");
                    assert!(s.power_limit_w > 0.0 && s.sm_clock_mhz > 0 && s.gpu_util_pct <= 100, "{s:?}");
                    assert_eq!(s.last_xid.is_some(), s.xid_errors > 0, "{s:?}");
                }
                let text = prometheus(&samples, "gpu-host", false);
                eprintln!("{text}");
                let (lines, _) = prometheus::tests::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
                assert!(lines.iter().any(|l| l.name == "DCGM_FI_DEV_GPU_TEMP"));
                let _ = source.take_events();
                assert!(matches!(source.inject(0, GpuEventKind::EccUncorrectable), Err(GpuError::NotSimulated)));
                // Sampling again (and dropping the source) must work too.
                assert_eq!(source.sample().len(), inventory.len());
                drop(source);
            }
        }
    }

    #[test]
    fn gpu_none_has_no_gpus() {
        let mut none = none();
        assert!(none.inventory().is_empty() && none.sample().is_empty() && none.take_events().is_empty());
        assert!(!none.simulated());
        assert!(matches!(none.inject(0, GpuEventKind::Xid(1)), Err(GpuError::NotSimulated)));
    }

    #[test]
    fn gpu_memory_repair_total() {
        assert_eq!(MemoryRepair::RetiredPages { sbe: 2, dbe: 3, pending: false }.total(), 5);
        let rows = MemoryRepair::RemappedRows { correctable: 1, uncorrectable: 4, pending: true, failed: false };
        assert_eq!(rows.total(), 5);
    }
}
