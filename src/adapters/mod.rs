//! The adapter methods, one file each, named after the method, and the **registry**: the one
//! list of methods that everything enumerating methods is derived from.
//!
//! Each line of `methods!` names a method's file and the type that implements
//! [`Method`] there (plus the file's other public items, re-exported here). From that list come
//! [`AdapterConfig`] (one variant per method, tagged by PEFT's `peft_type`),
//! [`AdapterConfig::PEFT_TYPES`], and [`variants`] / [`AdapterConfig::for_method`] (the names the
//! CLI's `--method` and the sweep's `methods` accept). Adding a method is one new file and one
//! line here: see `CONTRIBUTING.md`.
//!
//! Files that are not methods of their own: [`update`] (the additive low-rank update that the
//! LoRA family shares), [`dora`] (the weight decomposition that DoRA and EDoRA wrap around an
//! update) and `common` (inits, dropout, checks).

pub(crate) mod common;
pub mod dora;
pub mod update;

pub use dora::Dora;
pub use update::LowRankUpdate;

use candle_core::{DType, Device};

use crate::adapter::BuiltAdapter;
use crate::method::{self, BuildContext, Method, MethodConfig, MethodParams, PeftField, SharedTensors, Variant};
use crate::target::TargetConfig;
use crate::{Error, Result};

/// Declares the methods: `file => MethodType, other_public_items;` per line.
macro_rules! methods {
    ($($module:ident => $method:ident $(, $export:ident)*;)*) => {
        $(pub mod $module;)*

        /// Every method's type and public items, re-exported here and at the crate root.
        pub mod exports {
            $(pub use super::$module::{$method $(, $export)*};)*
        }
        pub use exports::*;

        /// An adapter config of any method: PEFT's `adapter_config.json`, tagged by
        /// `peft_type` (see [`crate::config`] for reading and writing it).
        #[derive(Debug, Clone)]
        pub enum AdapterConfig {
            $(
                #[doc = concat!("The config of [`", stringify!($method), "`].")]
                $method(<$method as Method>::Config),
            )*
        }

        impl AdapterConfig {
            /// The `peft_type` values candle-peft reads and writes.
            pub const PEFT_TYPES: &'static [&'static str] = &[$(<$method as Method>::PEFT_TYPE),*];

            /// The method's `peft_type`.
            pub fn peft_type(&self) -> &'static str {
                match self {
                    $(Self::$method(_) => <$method as Method>::PEFT_TYPE,)*
                }
            }

            /// The method as a user names it (`dora` for PEFT's `LORA` with `use_dora`).
            pub fn method_name(&self) -> &'static str {
                match self {
                    $(Self::$method(c) => <$method as Method>::variant(c),)*
                }
            }

            /// The module selection.
            pub fn target(&self) -> &TargetConfig {
                match self {
                    $(Self::$method(c) => c.target(),)*
                }
            }

            /// The module selection, mutably.
            pub fn target_mut(&mut self) -> &mut TargetConfig {
                match self {
                    $(Self::$method(c) => c.target_mut(),)*
                }
            }

            /// The PEFT fields of this method that no config struct holds.
            pub(crate) fn peft_fields(&self) -> &'static [PeftField] {
                match self {
                    $(Self::$method(_) => <<$method as Method>::Config as MethodConfig>::PEFT_FIELDS,)*
                }
            }

            /// The method's own checks of its hyper-parameters.
            pub(crate) fn validate_method(&self) -> Result<()> {
                match self {
                    $(Self::$method(c) => <$method as Method>::validate(c),)*
                }
            }

            /// The tensors every layer shares, drawn for layers of the given `(in, out)` shapes
            /// (none for most methods).
            pub fn shared_tensors(
                &self,
                shapes: &[(usize, usize)],
                dtype: DType,
                device: &Device,
            ) -> Result<SharedTensors> {
                match self {
                    $(Self::$method(c) => <$method as Method>::shared_tensors(c, shapes, dtype, device),)*
                }
            }

            /// Checks shared tensors read from a file before they are used.
            pub fn check_shared(&self, shared: &SharedTensors) -> Result<()> {
                match self {
                    $(Self::$method(c) => method::check_shared::<$method>(c, shared),)*
                }
            }

            /// Builds the adapter of the layer in `ctx`.
            pub fn build(&self, ctx: BuildContext<'_>) -> Result<BuiltAdapter> {
                match self {
                    $(Self::$method(c) => <$method as Method>::build(c, ctx),)*
                }
            }

            /// This config as PEFT must read it (see [`MethodConfig::to_peft`]).
            pub(crate) fn to_peft(&self) -> Result<Self> {
                Ok(match self {
                    $(Self::$method(c) => Self::$method(c.to_peft()?),)*
                })
            }

            /// The config as JSON, without `peft_type`.
            pub(crate) fn fields_json(&self) -> Result<serde_json::Value> {
                Ok(match self {
                    $(Self::$method(c) => serde_json::to_value(c)?,)*
                })
            }

            /// The config of PEFT type `peft_type` from its JSON fields; `None` for a type no
            /// method has.
            pub(crate) fn from_fields_json(peft_type: &str, fields: serde_json::Value) -> Option<Result<Self>> {
                $(
                    if peft_type == <$method as Method>::PEFT_TYPE {
                        return Some(serde_json::from_value(fields).map(Self::$method).map_err(Error::from));
                    }
                )*
                None
            }

            /// The config of the method a user names `name` (see [`variants`]) for `params`.
            /// An unknown name is an error that lists the known ones.
            pub fn for_method(name: &str, params: &MethodParams) -> Result<Self> {
                $(
                    if <$method as Method>::VARIANTS.iter().any(|v| v.name == name) {
                        return Ok(Self::$method(method::configure::<$method>(name, params)?));
                    }
                )*
                Err(Error::config(
                    "method",
                    format!("unknown method `{name}`; the methods are: {}", variant_names().join(", ")),
                ))
            }
        }

        /// Every method as users name it, with what it reads and writes, in registry order.
        pub fn variants() -> Vec<&'static Variant> {
            let mut all = Vec::new();
            $(all.extend(<$method as Method>::VARIANTS.iter());)*
            all
        }
    };
}

methods! {
    lora => Lora, LoraConfig, LoraInit, LoraParams;
    bora => Bora;
    lora_xs => LoraXs;
    edora => EDora;
    melora => Melora, MeloraConfig;
    vera => Vera, VeraConfig;
    randlora => RandLora, RandLoraConfig;
    loha => Loha, LohaConfig;
}

/// The names of [`variants`].
pub fn variant_names() -> Vec<&'static str> {
    variants().into_iter().map(|v| v.name).collect()
}
