//! Run-time device choice: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
//!
//! Backends are compile-time cargo features (`cuda`, `metal`); the device is picked at run time.
//! Asking for a backend that was not compiled in is an error that names the feature.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// A device request as a user writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA GPU if compiled in and present, else Metal if compiled in and present,
    /// else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU number `N` (`cuda` alone means `cuda:0`).
    Cuda(usize),
    /// The Metal GPU.
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" | "mps" => Ok(Self::Metal),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| Error::UnknownDevice(s.to_string())),
                None => Err(Error::UnknownDevice(s.to_string())),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device.
    ///
    /// `Auto` never fails: it falls back to the CPU and logs (at `info`) which device it chose.
    /// An explicit `cuda:N` or `metal` fails with [`Error::BackendNotCompiled`] when the feature
    /// is off, or with candle's driver error when no such GPU is present.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::BackendNotCompiled { device: self.to_string(), feature: "cuda" });
                }
                Ok(Device::new_cuda(n)?)
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(Error::BackendNotCompiled { device: self.to_string(), feature: "metal" });
                }
                Ok(Device::new_metal(0)?)
            }
            Self::Auto => {
                let device =
                    [Self::Cuda(0), Self::Metal].into_iter().find_map(|spec| spec.open().ok()).unwrap_or(Device::Cpu);
                tracing::info!("device auto: using {device:?}");
                Ok(device)
            }
        }
    }
}

/// Parses and opens a device string in one step: `device("cpu")?`.
pub fn device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal);
        assert!(matches!("cuda:x".parse::<DeviceSpec>(), Err(Error::UnknownDevice(_))));
        assert!(matches!("tpu".parse::<DeviceSpec>(), Err(Error::UnknownDevice(_))));
    }

    #[test]
    fn cpu_and_auto_open() {
        assert!(device("cpu").unwrap().is_cpu());
        device("auto").unwrap();
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_names_the_feature() {
        let err = device("cuda:0").unwrap_err();
        assert!(matches!(err, Error::BackendNotCompiled { feature: "cuda", .. }));
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_feature_names_the_feature() {
        let err = device("metal").unwrap_err();
        assert!(err.to_string().contains("--features metal"), "{err}");
    }
}
