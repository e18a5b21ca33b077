//! GPU samples as Prometheus text, with dcgm-exporter's metric names, types, help texts and
//! labels (`gpu`, `UUID`, `device`, `modelName`, `Hostname`), so that dashboards built for
//! dcgm-exporter (e.g. Grafana 12239) work unchanged.

use std::fmt::Write as _;

use super::{GpuSample, MemoryRepair};

/// One metric family: name, Prometheus type, help, and the value for a sample (None: the GPU
/// does not have it, no line).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&GpuSample) -> Option<f64>,
}

fn retired(s: &GpuSample) -> Option<(u64, u64, bool)> {
    match s.memory_repair {
        Some(MemoryRepair::RetiredPages { sbe, dbe, pending }) => Some((sbe, dbe, pending)),
        _ => None,
    }
}

fn remapped(s: &GpuSample) -> Option<(u64, u64, bool, bool)> {
    match s.memory_repair {
        Some(MemoryRepair::RemappedRows { correctable, uncorrectable, pending, failed }) => {
            Some((correctable, uncorrectable, pending, failed))
        }
        _ => None,
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

// Types follow dcgm-exporter's default-counters.csv: error totals are counters (they only
// grow until the driver reloads), everything else is a gauge.
const FAMILIES: &[Family] = &[
    Family {
        name: "DCGM_FI_DEV_SM_CLOCK",
        kind: "gauge",
        help: "SM clock frequency (in MHz).",
        value: |s| Some(s.sm_clock_mhz.into()),
    },
    Family {
        name: "DCGM_FI_DEV_GPU_TEMP",
        kind: "gauge",
        help: "GPU temperature (in C).",
        value: |s| Some(s.temperature_c.into()),
    },
    Family { name: "DCGM_FI_DEV_POWER_USAGE", kind: "gauge", help: "Power draw (in W).", value: |s| Some(s.power_w) },
    Family {
        name: "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
        kind: "gauge",
        help: "Effective power limit that the driver enforces (in W).",
        value: |s| Some(s.power_limit_w),
    },
    Family {
        name: "DCGM_FI_DEV_GPU_UTIL",
        kind: "gauge",
        help: "GPU utilization (in %).",
        value: |s| Some(s.gpu_util_pct.into()),
    },
    Family {
        name: "DCGM_FI_DEV_MEM_COPY_UTIL",
        kind: "gauge",
        help: "Memory utilization (in %).",
        value: |s| Some(s.mem_util_pct.into()),
    },
    Family {
        name: "DCGM_FI_DEV_FB_FREE",
        kind: "gauge",
        help: "Framebuffer memory free (in MiB).",
        value: |s| Some(s.mem_total_mib.saturating_sub(s.mem_used_mib) as f64),
    },
    Family {
        name: "DCGM_FI_DEV_FB_USED",
        kind: "gauge",
        help: "Framebuffer memory used (in MiB).",
        value: |s| Some(s.mem_used_mib as f64),
    },
    Family {
        name: "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        kind: "counter",
        help: "Total number of single-bit volatile ECC errors.",
        value: |s| Some(s.ecc_corrected as f64),
    },
    Family {
        name: "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        kind: "counter",
        help: "Total number of double-bit volatile ECC errors.",
        value: |s| Some(s.ecc_uncorrected as f64),
    },
    Family {
        name: "DCGM_FI_DEV_XID_ERRORS",
        kind: "gauge",
        help: "Value of the last XID error encountered.",
        value: |s| Some(s.last_xid.unwrap_or(0) as f64),
    },
    Family {
        name: "DCGM_FI_DEV_RETIRED_SBE",
        kind: "counter",
        help: "Total number of retired pages due to single-bit errors.",
        value: |s| retired(s).map(|(sbe, _, _)| sbe as f64),
    },
    Family {
        name: "DCGM_FI_DEV_RETIRED_DBE",
        kind: "counter",
        help: "Total number of retired pages due to double-bit errors.",
        value: |s| retired(s).map(|(_, dbe, _)| dbe as f64),
    },
    Family {
        name: "DCGM_FI_DEV_RETIRED_PENDING",
        kind: "counter",
        help: "Total number of pages pending retirement.",
        value: |s| retired(s).map(|(_, _, pending)| flag(pending)),
    },
    Family {
        name: "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        kind: "counter",
        help: "Number of remapped rows for uncorrectable errors",
        value: |s| remapped(s).map(|(_, uncorrectable, _, _)| uncorrectable as f64),
    },
    Family {
        name: "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        kind: "counter",
        help: "Number of remapped rows for correctable errors",
        value: |s| remapped(s).map(|(correctable, _, _, _)| correctable as f64),
    },
    Family {
        name: "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        kind: "gauge",
        help: "Whether remapping of rows has failed",
        value: |s| remapped(s).map(|(_, _, _, failed)| flag(failed)),
    },
    Family {
        name: "DCGM_FI_DEV_ROW_REMAP_PENDING",
        kind: "gauge",
        help: "Whether remapping of rows is pending (a GPU reset is needed)",
        value: |s| remapped(s).map(|(_, _, pending, _)| flag(pending)),
    },
    Family {
        name: "tessera_gpu_xid_errors_total",
        kind: "counter",
        help: "XID errors seen since the agent started.",
        value: |s| Some(s.xid_errors as f64),
    },
];

/// Renders `samples` as Prometheus text exposition: each family with `# HELP` and `# TYPE`,
/// one line per GPU labelled `gpu`, `UUID`, `device`, `modelName`, `Hostname` (left out when
/// empty, as dcgm-exporter does) and, for simulated GPUs, `simulated="true"`. Families that no
/// GPU has (retired pages on a GPU that remaps rows, ...) are left out.
pub fn prometheus(samples: &[GpuSample], hostname: &str, simulated: bool) -> String {
    let labels: Vec<String> = samples.iter().map(|s| labels(s, hostname, simulated)).collect();
    let mut out = String::new();
    for family in FAMILIES {
        let values: Vec<(&str, f64)> =
            samples.iter().zip(&labels).filter_map(|(s, l)| (family.value)(s).map(|v| (l.as_str(), v))).collect();
        if values.is_empty() {
            continue;
        }
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(family.help));
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
        for (labels, value) in values {
            let _ = writeln!(out, "{}{{{}}} {}", family.name, labels, format_value(value));
        }
    }
    out
}

fn labels(s: &GpuSample, hostname: &str, simulated: bool) -> String {
    let mut out = format!(
        "gpu=\"{}\",UUID=\"{}\",device=\"nvidia{}\",modelName=\"{}\"",
        s.index,
        escape_label(&s.uuid),
        s.index,
        escape_label(&s.model)
    );
    if !hostname.is_empty() {
        let _ = write!(out, ",Hostname=\"{}\"", escape_label(hostname));
    }
    if simulated {
        out.push_str(",simulated=\"true\"");
    }
    out
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help texts escape backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        // Rust prints whole floats without a fraction (700.0 -> "700") and never uses an
        // exponent, both of which Prometheus reads.
        format!("{v}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gpu::{GpuEventKind, GpuSource, Simulated};
    use std::collections::{BTreeMap, HashMap};

    /// One sample line of the exposition, label values unescaped.
    #[derive(Debug)]
    pub(crate) struct Line {
        pub(crate) name: String,
        pub(crate) labels: BTreeMap<String, String>,
        pub(crate) value: f64,
    }

    fn is_name(s: &str, allow_colon: bool) -> bool {
        let mut chars = s.chars();
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (allow_colon && c == ':');
        chars.next().is_some_and(ok_first)
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (allow_colon && c == ':'))
    }

    /// A strict little parser for the text format: every line is a HELP, a TYPE or a sample;
    /// HELP and TYPE come once per family, before its samples; samples of a family are
    /// contiguous; label names are valid and unique; values are numbers.
    pub(crate) fn parse(text: &str) -> Result<(Vec<Line>, HashMap<String, String>), String> {
        let mut lines = Vec::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helped: Vec<String> = Vec::new();
        let mut finished: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the exposition must end with a line feed".into());
        }
        for (n, line) in text.lines().enumerate() {
            let err = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _help) = rest.split_once(' ').ok_or_else(|| err("HELP without text"))?;
                if !is_name(name, true) || helped.iter().any(|h| h == name) {
                    return Err(err("bad or repeated HELP"));
                }
                if let Some(done) = current.take() {
                    finished.push(done);
                }
                helped.push(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| err("TYPE without type"))?;
                if !matches!(kind, "gauge" | "counter") || types.contains_key(name) {
                    return Err(err("bad or repeated TYPE"));
                }
                if helped.last().map(String::as_str) != Some(name) {
                    return Err(err("TYPE does not follow its HELP"));
                }
                types.insert(name.to_string(), kind.to_string());
            } else if line.starts_with('#') || line.trim().is_empty() {
                return Err(err("unexpected comment or blank line"));
            } else {
                let brace = line.find('{').ok_or_else(|| err("sample without labels"))?;
                let name = &line[..brace];
                if !is_name(name, true) || !types.contains_key(name) {
                    return Err(err("sample of an undeclared family"));
                }
                if finished.iter().any(|f| f == name) {
                    return Err(err("family samples are not contiguous"));
                }
                current = Some(name.to_string());
                let mut labels = BTreeMap::new();
                let mut chars = line[brace + 1..].chars().peekable();
                loop {
                    let label: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    if !is_name(&label, false) {
                        return Err(err("bad label name"));
                    }
                    if chars.next() != Some('"') {
                        return Err(err("label value without quote"));
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().ok_or_else(|| err("unterminated label value"))? {
                            '"' => break,
                            '\\' => match chars.next() {
                                Some('\\') => value.push('\\'),
                                Some('"') => value.push('"'),
                                Some('n') => value.push('\n'),
                                _ => return Err(err("bad escape")),
                            },
                            '\n' => return Err(err("raw line feed in label value")),
                            c => value.push(c),
                        }
                    }
                    if labels.insert(label, value).is_some() {
                        return Err(err("repeated label"));
                    }
                    match chars.next() {
                        Some(',') => continue,
                        Some('}') => break,
                        _ => return Err(err("expected , or }")),
                    }
                }
                let rest: String = chars.collect();
                let value = rest.strip_prefix(' ').ok_or_else(|| err("no space before value"))?;
                let value = match value {
                    "NaN" => f64::NAN,
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse::<f64>().map_err(|_| err("value is not a number"))?,
                };
                lines.push(Line { name: name.to_string(), labels, value });
            }
        }
        for name in &helped {
            if !types.contains_key(name) {
                return Err(format!("{name} has HELP but no TYPE"));
            }
        }
        Ok((lines, types))
    }

    fn find<'a>(lines: &'a [Line], name: &str, gpu: u32) -> &'a Line {
        lines
            .iter()
            .find(|l| l.name == name && l.labels["gpu"] == gpu.to_string())
            .unwrap_or_else(|| panic!("no {name} for gpu {gpu}"))
    }

    #[test]
    fn gpu_prometheus_checker_rejects_broken_text() {
        let ok = "# HELP a x\n# TYPE a gauge\na{gpu=\"0\"} 1\n";
        assert!(parse(ok).is_ok());
        assert!(parse("a{gpu=\"0\"} 1\n").is_err(), "undeclared family");
        assert!(parse("# HELP a x\n# TYPE a gauge\na{gpu=\"0} 1\n").is_err(), "unterminated value");
        assert!(parse("# HELP a x\n# TYPE a gauge\na{gpu=\"a\"b\"} 1\n").is_err(), "bare quote");
        assert!(parse("# HELP a x\n# TYPE a gauge\na{gpu=\"0\"} one\n").is_err(), "bad value");
        assert!(parse("# HELP a x\n# TYPE a gauge\na{gpu=\"0\",gpu=\"1\"} 1\n").is_err(), "repeated label");
        assert!(parse("# HELP a x\n# TYPE a gauge\na{gpu=\"0\"} 1").is_err(), "no final line feed");
        assert!(parse("# HELP a x\na{gpu=\"0\"} 1\n").is_err(), "no TYPE");
    }

    #[test]
    fn gpu_prometheus_has_dcgm_names_and_labels() {
        let mut sim = Simulated::new("2xH100-80GB,1xV100-16GB", "node-a").unwrap();
        sim.set_busy(0, true);
        sim.inject(1, GpuEventKind::Xid(79)).unwrap();
        sim.inject(1, GpuEventKind::Xid(48)).unwrap();
        sim.inject(2, GpuEventKind::EccUncorrectable).unwrap();
        let samples = sim.sample();
        let text = prometheus(&samples, "node-a.example", true);
        let (lines, types) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

        for name in [
            "DCGM_FI_DEV_GPU_UTIL",
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "DCGM_FI_DEV_FB_USED",
            "DCGM_FI_DEV_FB_FREE",
            "DCGM_FI_DEV_GPU_TEMP",
            "DCGM_FI_DEV_POWER_USAGE",
            "DCGM_FI_DEV_SM_CLOCK",
            "DCGM_FI_DEV_XID_ERRORS",
        ] {
            assert_eq!(types.get(name).map(String::as_str), Some("gauge"), "{name}");
            assert_eq!(lines.iter().filter(|l| l.name == name).count(), 3, "{name}");
        }
        for name in ["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] {
            assert_eq!(types.get(name).map(String::as_str), Some("counter"), "{name}");
        }
        for line in &lines {
            let keys: Vec<&str> = line.labels.keys().map(String::as_str).collect();
            assert_eq!(keys, ["Hostname", "UUID", "device", "gpu", "modelName", "simulated"], "{line:?}");
            assert_eq!(line.labels["Hostname"], "node-a.example");
            assert_eq!(line.labels["simulated"], "true");
        }
        let util = find(&lines, "DCGM_FI_DEV_GPU_UTIL", 0);
        assert_eq!(util.labels["UUID"], "GPU-SIM-node-a-0");
        assert_eq!(util.labels["device"], "nvidia0");
        assert_eq!(util.labels["modelName"], "NVIDIA H100 80GB (simulated)");
        assert_eq!(util.value, f64::from(samples[0].gpu_util_pct));
        assert!(util.value > 90.0);
        assert_eq!(find(&lines, "DCGM_FI_DEV_GPU_UTIL", 1).value, f64::from(samples[1].gpu_util_pct));
        let used = find(&lines, "DCGM_FI_DEV_FB_USED", 0).value;
        let free = find(&lines, "DCGM_FI_DEV_FB_FREE", 0).value;
        assert_eq!(used + free, 81920.0);
        assert_eq!(find(&lines, "DCGM_FI_DEV_POWER_USAGE", 0).value, samples[0].power_w);
        // dcgm's XID metric is the last XID, not a count.
        assert_eq!(find(&lines, "DCGM_FI_DEV_XID_ERRORS", 1).value, 48.0);
        assert_eq!(find(&lines, "DCGM_FI_DEV_XID_ERRORS", 0).value, 0.0);
        assert_eq!(find(&lines, "tessera_gpu_xid_errors_total", 1).value, 2.0);
        assert_eq!(find(&lines, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 2).value, 1.0);
        // H100s remap rows, the V100 retires pages: each family only for the GPUs that have it.
        assert_eq!(find(&lines, "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 0).value, 0.0);
        assert!(!lines.iter().any(|l| l.name == "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS" && l.labels["gpu"] == "2"));
        assert_eq!(find(&lines, "DCGM_FI_DEV_RETIRED_DBE", 2).value, 1.0);
        assert_eq!(lines.iter().filter(|l| l.name == "DCGM_FI_DEV_RETIRED_DBE").count(), 1);
    }

    #[test]
    fn gpu_prometheus_real_gpus_have_no_simulated_label_and_no_empty_hostname() {
        let mut sim = Simulated::new("1xA100-40GB", "n").unwrap();
        let mut samples = sim.sample();
        samples[0].memory_repair = None;
        samples[0].retired_pages = None;
        let text = prometheus(&samples, "", false);
        let (lines, types) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(!text.contains(",simulated="), "{text}");
        assert!(!text.contains("Hostname"), "{text}");
        assert!(!types.contains_key("DCGM_FI_DEV_RETIRED_DBE"));
        assert!(!types.contains_key("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"));
        assert!(lines.iter().all(|l| l.labels.len() == 4));
        assert_eq!(prometheus(&[], "h", true), "");
    }

    #[test]
    fn gpu_prometheus_escapes_label_values() {
        let mut sim = Simulated::new("1xH100-80GB", "n").unwrap();
        let mut samples = sim.sample();
        samples[0].model = "NVIDIA \"H100\"\nC:\\gpu".into();
        samples[0].uuid = "GPU-\\\"".into();
        samples[0].power_w = f64::NAN;
        let host = "evil\"} 1\nDCGM_FI_DEV_GPU_UTIL{gpu=\"9\"";
        let text = prometheus(&samples, host, true);
        assert!(text.contains(r#"modelName="NVIDIA \"H100\"\nC:\\gpu""#), "{text}");
        assert!(text.contains(r#"UUID="GPU-\\\"""#), "{text}");
        let (lines, _) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(lines.iter().all(|l| l.labels["gpu"] == "0"), "an injected sample line got through");
        let util = find(&lines, "DCGM_FI_DEV_GPU_UTIL", 0);
        assert_eq!(util.labels["modelName"], samples[0].model);
        assert_eq!(util.labels["UUID"], samples[0].uuid);
        assert_eq!(util.labels["Hostname"], host);
        assert!(find(&lines, "DCGM_FI_DEV_POWER_USAGE", 0).value.is_nan());
    }

    #[test]
    fn gpu_prometheus_value_format() {
        assert_eq!(format_value(700.0), "700");
        assert_eq!(format_value(612.5), "612.5");
        assert_eq!(format_value(1e21), "1000000000000000000000");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }
}
