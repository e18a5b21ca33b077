//! Real GPUs through NVML (nvml-wrapper 0.13).
//!
//! Rules, because this runs on every GPU host and must never take the agent down:
//! - Nothing here panics on an NVML error. A query that the GPU does not support (or that fails
//!   for another reason) gives a default value, logged once per GPU and query; one GPU that
//!   fell off the bus drops out of the samples without affecting the others.
//! - XID and double-bit ECC events come from a dedicated thread waiting on an NVML event set;
//!   where the GPUs do not support event registration, a warning is logged once and uncorrected
//!   ECC errors are still reported, from the growth of the volatile counters.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nvml_wrapper as nv;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_REMAPPED_UNC,
    NVML_FI_DEV_RETIRED_DBE, NVML_FI_DEV_RETIRED_PENDING, NVML_FI_DEV_RETIRED_SBE,
};

use super::{GpuError, GpuEvent, GpuEventKind, GpuInfo, GpuSample, GpuSource, MemoryRepair};

const MIB: u64 = 1024 * 1024;
/// Events kept for `take_events` when nobody takes them; older ones are dropped (the counters
/// in the samples stay exact).
const MAX_QUEUED_EVENTS: usize = 4096;
/// XID number NVML reports when it does not know the XID.
const UNKNOWN_XID: u64 = 999;

/// What the event thread and the sampler share.
#[derive(Debug, Default)]
struct Shared {
    events: Vec<GpuEvent>,
    xids: HashMap<u32, XidCount>,
}

#[derive(Debug, Default, Clone, Copy)]
struct XidCount {
    count: u64,
    last: Option<u64>,
}

impl Shared {
    fn push(&mut self, event: GpuEvent) {
        if let GpuEventKind::Xid(xid) = event.kind {
            let count = self.xids.entry(event.index).or_default();
            count.count += 1;
            count.last = Some(xid);
        }
        if self.events.len() >= MAX_QUEUED_EVENTS {
            let excess = self.events.len() + 1 - MAX_QUEUED_EVENTS;
            self.events.drain(..excess);
        }
        self.events.push(event);
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data (counters
/// and a queue) is still usable.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Real GPUs through NVML.
pub struct Nvml {
    nvml: Arc<nv::Nvml>,
    inventory: Vec<GpuInfo>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    /// GPUs whose double-bit ECC errors arrive as events; for the others they are derived from
    /// the volatile counter.
    dbe_events: HashSet<u32>,
    last_uncorrected: HashMap<u32, u64>,
    /// (GPU, NVML call) already logged as failing.
    warned: HashSet<(u32, &'static str)>,
    /// When the per-process query last ran.
    processes_at: Option<std::time::Instant>,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvml").field("inventory", &self.inventory).finish_non_exhaustive()
    }
}

impl Nvml {
    /// Loads libnvidia-ml, initialises NVML, reads the inventory and starts the event thread.
    /// Fails with [`GpuError::NoDriver`] where there is no usable driver.
    pub fn init() -> Result<Self, GpuError> {
        let nvml = nv::Nvml::init().map_err(no_driver)?;
        let nvml = Arc::new(nvml);
        let count = nvml.device_count().map_err(|source| GpuError::Nvml { call: "nvmlDeviceGetCount", source })?;
        let mut inventory = Vec::new();
        for index in 0..count {
            match describe(&nvml, index) {
                Ok(info) => inventory.push(info),
                Err((call, error)) => {
                    tracing::warn!(gpu = index, call, %error, "NVML cannot describe this GPU; leaving it out")
                }
            }
        }
        let driver = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".into());
        tracing::info!(gpus = inventory.len(), driver = %driver, "NVML initialised");
        if inventory.is_empty() {
            tracing::warn!(devices = count, "NVML works but reports no usable GPU");
        }

        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let indices: Vec<u32> = inventory.iter().map(|g| g.index).collect();
        let dbe_events = events::start(&nvml, &indices, &shared, &stop);
        Ok(Self {
            nvml,
            inventory,
            shared,
            stop,
            dbe_events,
            last_uncorrected: HashMap::new(),
            warned: HashSet::new(),
            processes_at: None,
        })
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // The event thread sees this within one wait timeout and exits, dropping its share of
        // NVML. It is not joined: a wedged driver must not hang the agent's shutdown.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Maps an `Nvml::init` failure to a message an operator can act on.
fn no_driver(error: NvmlError) -> GpuError {
    let reason = match &error {
        NvmlError::LibloadingError(e) => format!(
            "cannot load libnvidia-ml.so.1 ({e}); install the NVIDIA driver, or simulate GPUs with --simulate-gpus 8xH100-80GB"
        ),
        NvmlError::DriverNotLoaded => {
            "libnvidia-ml.so.1 is installed but the NVIDIA kernel driver is not loaded".to_string()
        }
        NvmlError::LibRmVersionMismatch => {
            "the NVIDIA kernel driver and libnvidia-ml versions differ (driver upgraded without reboot?)".to_string()
        }
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver (check /dev/nvidia*)".to_string(),
        NvmlError::FailedToLoadSymbol(s) => format!("libnvidia-ml.so.1 is too old for this agent: {s}"),
        other => format!("NVML initialisation failed: {other}"),
    };
    GpuError::NoDriver(reason)
}

/// Inventory entry of one GPU; the uuid is required (it is how the scheduler knows a GPU), the
/// name and memory size fall back to defaults.
fn describe(nvml: &nv::Nvml, index: u32) -> Result<GpuInfo, (&'static str, NvmlError)> {
    let device = nvml.device_by_index(index).map_err(|e| ("nvmlDeviceGetHandleByIndex", e))?;
    let uuid = device.uuid().map_err(|e| ("nvmlDeviceGetUUID", e))?;
    let model = device.name().unwrap_or_else(|error| {
        tracing::warn!(gpu = index, %error, "NVML cannot name this GPU");
        "NVIDIA GPU (unknown model)".to_string()
    });
    let memory_mib = match device.memory_info() {
        Ok(memory) => memory.total / MIB,
        Err(error) => {
            tracing::warn!(gpu = index, %error, "NVML cannot size this GPU's memory; reporting 0 MiB");
            0
        }
    };
    Ok(GpuInfo { index, uuid, model, memory_mib })
}

/// Logs a failing NVML query once per GPU and query: "not supported" quietly (it is normal on
/// some hardware), other errors as warnings.
fn note_failure(warned: &mut HashSet<(u32, &'static str)>, index: u32, call: &'static str, error: &NvmlError) {
    if warned.insert((index, call)) {
        match error {
            NvmlError::NotSupported => tracing::debug!(gpu = index, call, "not supported on this GPU; using a default"),
            error => tracing::warn!(gpu = index, call, %error, "NVML query failed; using a default"),
        }
    }
}

/// Reads NVML values of one GPU, turning failures into `None` (noted once) and remembering
/// whether the GPU is lost.
struct Reader<'a> {
    warned: &'a mut HashSet<(u32, &'static str)>,
    index: u32,
    lost: bool,
}

impl Reader<'_> {
    fn ok<T>(&mut self, call: &'static str, result: Result<T, NvmlError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.lost |= matches!(error, NvmlError::GpuLost);
                note_failure(self.warned, self.index, call, &error);
                None
            }
        }
    }
}

fn sample_value(value: &SampleValue) -> u64 {
    match *value {
        SampleValue::U32(v) => u64::from(v),
        SampleValue::U64(v) => v,
        SampleValue::I64(v) => u64::try_from(v).unwrap_or(0),
        SampleValue::F64(v) if v.is_finite() && v >= 0.0 => v as u64,
        SampleValue::F64(_) => 0,
    }
}

/// Retired pages (pre-Ampere) or remapped rows (Ampere and newer), read as NVML field values
/// in one call. None where the GPU has neither (or the driver is too old to say).
fn memory_repair(device: &nv::Device<'_>) -> Result<Option<MemoryRepair>, NvmlError> {
    const IDS: [u32; 7] = [
        NVML_FI_DEV_REMAPPED_COR,
        NVML_FI_DEV_REMAPPED_UNC,
        NVML_FI_DEV_REMAPPED_PENDING,
        NVML_FI_DEV_REMAPPED_FAILURE,
        NVML_FI_DEV_RETIRED_SBE,
        NVML_FI_DEV_RETIRED_DBE,
        NVML_FI_DEV_RETIRED_PENDING,
    ];
    let ids = IDS.map(FieldId);
    let values = device.field_values_for(&ids)?;
    let get = |id: u32| -> Option<u64> {
        values.iter().find_map(|v| match v {
            Ok(sample) if sample.field.0 == id => sample.value.as_ref().ok().map(sample_value),
            _ => None,
        })
    };
    if let (Some(correctable), Some(uncorrectable)) = (get(NVML_FI_DEV_REMAPPED_COR), get(NVML_FI_DEV_REMAPPED_UNC)) {
        return Ok(Some(MemoryRepair::RemappedRows {
            correctable,
            uncorrectable,
            pending: get(NVML_FI_DEV_REMAPPED_PENDING).unwrap_or(0) != 0,
            failed: get(NVML_FI_DEV_REMAPPED_FAILURE).unwrap_or(0) != 0,
        }));
    }
    if let (Some(sbe), Some(dbe)) = (get(NVML_FI_DEV_RETIRED_SBE), get(NVML_FI_DEV_RETIRED_DBE)) {
        return Ok(Some(MemoryRepair::RetiredPages {
            sbe,
            dbe,
            pending: get(NVML_FI_DEV_RETIRED_PENDING).unwrap_or(0) != 0,
        }));
    }
    Ok(None)
}

impl GpuSource for Nvml {
    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        let query_processes = self.processes_at.is_none_or(|t| t.elapsed() >= super::PROCESS_QUERY_INTERVAL);
        if query_processes {
            self.processes_at = Some(std::time::Instant::now());
        }
        let Self { nvml, inventory, shared, dbe_events, last_uncorrected, warned, .. } = self;
        let xids = lock(shared).xids.clone();
        let mut derived_events = Vec::new();
        let mut samples = Vec::with_capacity(inventory.len());
        for info in inventory.iter() {
            let index = info.index;
            let device = match nvml.device_by_index(index) {
                Ok(device) => device,
                Err(error) => {
                    note_failure(warned, index, "nvmlDeviceGetHandleByIndex", &error);
                    continue;
                }
            };
            let mut r = Reader { warned: &mut *warned, index, lost: false };
            let utilization = r.ok("nvmlDeviceGetUtilizationRates", device.utilization_rates());
            let memory = r.ok("nvmlDeviceGetMemoryInfo_v2", device.memory_info());
            let temperature = r.ok("nvmlDeviceGetTemperature", device.temperature(TemperatureSensor::Gpu));
            let power_mw = r.ok("nvmlDeviceGetPowerUsage", device.power_usage());
            let limit_mw = r.ok("nvmlDeviceGetEnforcedPowerLimit", device.enforced_power_limit());
            let sm_clock = r.ok("nvmlDeviceGetClockInfo(SM)", device.clock_info(Clock::SM));
            let corrected = r.ok(
                "nvmlDeviceGetTotalEccErrors(corrected)",
                device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
            );
            let uncorrected = r.ok(
                "nvmlDeviceGetTotalEccErrors(uncorrected)",
                device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            );
            let repair = r.ok("nvmlDeviceGetFieldValues(retired/remapped)", memory_repair(&device)).flatten();
            let processes = if query_processes {
                r.ok("nvmlDeviceGetComputeRunningProcesses", device.running_compute_processes()).map(|ps| {
                    ps.iter()
                        .map(|p| super::GpuProcess {
                            pid: p.pid,
                            used_mib: match p.used_gpu_memory {
                                nv::enums::device::UsedGpuMemory::Used(bytes) => bytes / (1024 * 1024),
                                nv::enums::device::UsedGpuMemory::Unavailable => 0,
                            },
                        })
                        .collect()
                })
            } else {
                None
            };
            if r.lost {
                // A GPU that fell off the bus reads as zeros, which would look idle and healthy.
                continue;
            }

            let ecc_uncorrected = uncorrected.unwrap_or(0);
            if !dbe_events.contains(&index) {
                let previous = last_uncorrected.insert(index, ecc_uncorrected);
                if previous.is_some_and(|previous| ecc_uncorrected > previous) {
                    derived_events.push(GpuEvent { index, kind: GpuEventKind::EccUncorrectable });
                }
            }
            let xid = xids.get(&index).copied().unwrap_or_default();
            let (mem_used_mib, mem_total_mib) = match memory {
                Some(memory) => (memory.used / MIB, memory.total / MIB),
                None => (0, info.memory_mib),
            };
            samples.push(GpuSample {
                index,
                uuid: info.uuid.clone(),
                model: info.model.clone(),
                gpu_util_pct: utilization.as_ref().map_or(0, |u| u.gpu),
                mem_util_pct: utilization.as_ref().map_or(0, |u| u.memory),
                mem_used_mib,
                mem_total_mib,
                temperature_c: temperature.unwrap_or(0),
                power_w: f64::from(power_mw.unwrap_or(0)) / 1000.0,
                power_limit_w: f64::from(limit_mw.unwrap_or(0)) / 1000.0,
                sm_clock_mhz: sm_clock.unwrap_or(0),
                ecc_corrected: corrected.unwrap_or(0),
                ecc_uncorrected,
                retired_pages: repair.map(|r| r.total()),
                memory_repair: repair,
                xid_errors: xid.count,
                last_xid: xid.last,
                processes,
            });
        }
        if !derived_events.is_empty() {
            let mut shared = lock(shared);
            for event in derived_events {
                shared.push(event);
            }
        }
        samples
    }

    fn simulated(&self) -> bool {
        false
    }

    fn set_busy(&mut self, _index: u32, _busy: bool) {}

    fn take_events(&mut self) -> Vec<GpuEvent> {
        std::mem::take(&mut lock(&self.shared).events)
    }
}

#[cfg(target_os = "linux")]
mod events {
    //! The event thread: one NVML event set for all GPUs, waited on in a loop.

    use super::*;
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    use nvml_wrapper::event::EventSet;
    use nvml_wrapper::struct_wrappers::event::EventData;
    use std::sync::mpsc;

    /// How long one `EventSet::wait` blocks; bounds how long the thread outlives its source.
    const WAIT_MS: u32 = 500;
    /// How long `Nvml::init` waits for the registrations before going on without them.
    const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);

    /// Starts the event thread and returns the GPUs whose double-bit ECC errors it reports.
    pub(super) fn start(
        nvml: &Arc<nv::Nvml>,
        indices: &[u32],
        shared: &Arc<Mutex<Shared>>,
        stop: &Arc<AtomicBool>,
    ) -> HashSet<u32> {
        if indices.is_empty() {
            return HashSet::new();
        }
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (nvml, indices, shared, stop) = (Arc::clone(nvml), indices.to_vec(), Arc::clone(shared), Arc::clone(stop));
        let spawned = std::thread::Builder::new()
            .name("nvml-events".into())
            .spawn(move || run(&nvml, &indices, &shared, &stop, ready_tx));
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the NVML event thread; XID errors will not be reported");
            return HashSet::new();
        }
        match ready_rx.recv_timeout(REGISTRATION_TIMEOUT) {
            Ok(registered) => registered,
            Err(_) => {
                tracing::warn!("NVML event registration did not finish in time; going on without it for now");
                HashSet::new()
            }
        }
    }

    fn run(
        nvml: &nv::Nvml,
        indices: &[u32],
        shared: &Mutex<Shared>,
        stop: &AtomicBool,
        ready: mpsc::SyncSender<HashSet<u32>>,
    ) {
        let (set, registered) = register_all(nvml, indices);
        let dbe: HashSet<u32> = registered
            .iter()
            .filter(|(_, mask)| mask.contains(EventTypes::DOUBLE_BIT_ECC_ERROR))
            .map(|(index, _)| *index)
            .collect();
        let missing: Vec<u32> =
            indices.iter().copied().filter(|i| !registered.iter().any(|(index, _)| index == i)).collect();
        if !missing.is_empty() {
            tracing::warn!(
                gpus = ?missing,
                "XID event registration is not supported on these GPUs; their XID errors will not be reported"
            );
        }
        // `Nvml::init` may have stopped waiting; nothing to do then.
        let _ = ready.send(dbe);
        let Some(set) = set else { return };

        let mut failures: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            match set.wait(WAIT_MS) {
                Ok(data) => {
                    failures = 0;
                    handle(&data, indices, shared);
                }
                Err(NvmlError::Timeout) => failures = 0,
                Err(NvmlError::Uninitialized) => {
                    tracing::warn!("NVML was shut down; stopping the event thread");
                    return;
                }
                Err(error) => {
                    // GpuLost, Unknown, ...: keep going (other GPUs still matter) but back off.
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(%error, "waiting for NVML events failed; retrying");
                    }
                    let pause = Duration::from_millis(200 * u64::from(failures.min(25)));
                    let until = std::time::Instant::now() + pause;
                    while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    fn handle(data: &EventData<'_>, indices: &[u32], shared: &Mutex<Shared>) {
        let index = match data.device.index() {
            Ok(index) => index,
            Err(error) => {
                // Fall back to the uuid, which a lost GPU may still tell.
                match data.device.uuid() {
                    Ok(uuid) => {
                        tracing::warn!(%error, %uuid, "NVML event from a GPU whose index cannot be read");
                    }
                    Err(_) => tracing::warn!(%error, "NVML event from a GPU that cannot be identified"),
                }
                return;
            }
        };
        if !indices.contains(&index) {
            tracing::debug!(gpu = index, "NVML event from a GPU outside the inventory");
        }
        let mut events = Vec::new();
        if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            let xid = match data.event_data {
                Some(XidError::Value(xid)) => xid,
                Some(XidError::Unknown) | None => UNKNOWN_XID,
            };
            tracing::warn!(gpu = index, xid, "XID error");
            events.push(GpuEvent { index, kind: GpuEventKind::Xid(xid) });
        }
        if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
            tracing::warn!(gpu = index, "uncorrectable ECC error");
            events.push(GpuEvent { index, kind: GpuEventKind::EccUncorrectable });
        }
        if !events.is_empty() {
            let mut shared = lock(shared);
            for event in events {
                shared.push(event);
            }
        }
    }

    /// Registers XID (and, where supported, double-bit ECC) events of every GPU in one set.
    ///
    /// nvml-wrapper frees the set when a registration fails, which would lose the GPUs
    /// registered before; so after a failure the set is rebuilt from those, and the GPU is
    /// retried with XID alone before it is given up.
    fn register_all<'n>(nvml: &'n nv::Nvml, indices: &[u32]) -> (Option<EventSet<'n>>, Vec<(u32, EventTypes)>) {
        let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
        let mut registered: Vec<(u32, EventTypes)> = Vec::new();
        let mut set = match nvml.create_event_set() {
            Ok(set) => Some(set),
            Err(error) => {
                tracing::warn!(%error, "cannot create an NVML event set");
                return (None, registered);
            }
        };
        for &index in indices {
            let Ok(device) = nvml.device_by_index(index) else { continue };
            let mask = match device.supported_event_types() {
                Ok(supported) => supported & wanted,
                Err(NvmlError::NotSupported) => EventTypes::empty(),
                // Cannot tell: try XID, the one that matters most.
                Err(_) => EventTypes::CRITICAL_XID_ERROR,
            };
            if !mask.contains(EventTypes::CRITICAL_XID_ERROR) && !mask.is_empty() {
                tracing::debug!(gpu = index, "GPU reports ECC events but not XID events");
            }
            let mut attempts = vec![mask];
            if mask.contains(EventTypes::CRITICAL_XID_ERROR) && mask != EventTypes::CRITICAL_XID_ERROR {
                attempts.push(EventTypes::CRITICAL_XID_ERROR);
            }
            for attempt in attempts.into_iter().filter(|m| !m.is_empty()) {
                let Some(current) = set.take() else { break };
                match device.register_events(attempt, current) {
                    Ok(current) => {
                        set = Some(current);
                        registered.push((index, attempt));
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(gpu = index, events = ?attempt, %error, "NVML event registration failed");
                        set = rebuild(nvml, &registered);
                        if set.is_none() {
                            registered.clear();
                        }
                    }
                }
            }
            if set.is_none() {
                break;
            }
        }
        if registered.is_empty() {
            return (None, registered);
        }
        (set, registered)
    }

    fn rebuild<'n>(nvml: &'n nv::Nvml, registered: &[(u32, EventTypes)]) -> Option<EventSet<'n>> {
        let mut set = match nvml.create_event_set() {
            Ok(set) => set,
            Err(error) => {
                tracing::warn!(%error, "cannot recreate the NVML event set");
                return None;
            }
        };
        for &(index, mask) in registered {
            let device = nvml.device_by_index(index).ok()?;
            set = match device.register_events(mask, set) {
                Ok(set) => set,
                Err(error) => {
                    tracing::warn!(gpu = index, %error, "cannot re-register NVML events");
                    return None;
                }
            };
        }
        Some(set)
    }
}

#[cfg(not(target_os = "linux"))]
mod events {
    use super::*;

    /// NVML events exist on Linux only.
    pub(super) fn start(
        _nvml: &Arc<nv::Nvml>,
        _indices: &[u32],
        _shared: &Arc<Mutex<Shared>>,
        _stop: &Arc<AtomicBool>,
    ) -> HashSet<u32> {
        tracing::warn!("NVML events are only available on Linux; XID errors will not be reported");
        HashSet::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_nvml_event_queue_counts_xids_and_stays_bounded() {
        let mut shared = Shared::default();
        shared.push(GpuEvent { index: 3, kind: GpuEventKind::Xid(79) });
        shared.push(GpuEvent { index: 3, kind: GpuEventKind::EccUncorrectable });
        shared.push(GpuEvent { index: 3, kind: GpuEventKind::Xid(48) });
        let count = shared.xids[&3];
        assert_eq!((count.count, count.last), (2, Some(48)));
        for i in 0..MAX_QUEUED_EVENTS as u64 + 10 {
            shared.push(GpuEvent { index: 0, kind: GpuEventKind::Xid(i) });
        }
        assert_eq!(shared.events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(shared.events.last().unwrap().kind, GpuEventKind::Xid(MAX_QUEUED_EVENTS as u64 + 9));
        assert_eq!(shared.xids[&0].count, MAX_QUEUED_EVENTS as u64 + 10);
    }

    #[test]
    fn gpu_nvml_init_errors_are_no_driver_with_a_reason() {
        for (error, needle) in [
            (NvmlError::DriverNotLoaded, "kernel driver is not loaded"),
            (NvmlError::NoPermission, "permission"),
            (NvmlError::LibRmVersionMismatch, "differ"),
            (NvmlError::Unknown, "initialisation failed"),
        ] {
            match no_driver(error) {
                GpuError::NoDriver(message) => assert!(message.contains(needle), "{message}"),
                other => panic!("expected NoDriver, got {other}"),
            }
        }
    }

    #[test]
    fn gpu_nvml_sample_values_convert() {
        assert_eq!(sample_value(&SampleValue::U32(7)), 7);
        assert_eq!(sample_value(&SampleValue::U64(1 << 40)), 1 << 40);
        assert_eq!(sample_value(&SampleValue::I64(-1)), 0);
        assert_eq!(sample_value(&SampleValue::F64(f64::NAN)), 0);
        assert_eq!(sample_value(&SampleValue::F64(3.9)), 3);
    }
}
