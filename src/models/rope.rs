//! Rotary position embeddings' frequencies (Su et al. 2021, "RoFormer"), with the RoPE scalings
//! of the configs this crate loads: none (`default`), position interpolation (`linear`, Chen et
//! al. 2023) and Llama 3's (`llama3`). Any other `rope_type` is refused by name.
//!
//! ```text
//! default   inv_freq_i = theta^(-2i / d)                                 i = 0 .. d/2
//! linear    inv_freq_i / factor
//! llama3    wavelen_i = 2 pi / inv_freq_i
//!           inv_freq_i                       wavelen_i < L / high_freq_factor
//!           inv_freq_i / factor              wavelen_i > L / low_freq_factor
//!           (1 - s) inv_freq_i / factor + s inv_freq_i   otherwise,
//!           s = (L / wavelen_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
//!           L = original_max_position_embeddings
//! ```
//! (transformers' `modeling_rope_utils`: `_compute_default_rope_parameters`,
//! `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`; the frequencies are
//! computed in f32 as there.)

use serde_json::Value;

/// The RoPE of a config: its base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParameters {
    /// The base `theta`.
    pub theta: f64,
    /// The scaling of the frequencies.
    pub scaling: RopeScaling,
}

/// A RoPE scaling (`rope_parameters.rope_type`, or an older config's `rope_scaling.type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `default`: none.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained at before the extension.
        original_max_position_embeddings: f64,
    },
}

impl RopeParameters {
    /// Reads a config's RoPE: `rope_parameters` (transformers >= 5: `rope_type`, `rope_theta`
    /// and the scaling's own keys) when present, else `rope_theta` and `rope_scaling` (`type`
    /// or `rope_type`). `default_theta` when no base is given. Errors name the field.
    pub fn from_config(
        rope_parameters: Option<&Value>,
        rope_theta: Option<f64>,
        rope_scaling: Option<&Value>,
        default_theta: f64,
    ) -> std::result::Result<Self, (String, String)> {
        let (params, field) = match (rope_parameters.filter(|p| !p.is_null()), rope_scaling.filter(|s| !s.is_null())) {
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, Some(s)) => (Some(s), "rope_scaling"),
            (None, None) => (None, "rope_parameters"),
        };
        let theta =
            params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(rope_theta).unwrap_or(default_theta);
        if !(theta.is_finite() && theta > 0.0) {
            let field = if params.and_then(|p| p.get("rope_theta")).is_some() {
                format!("{field}.rope_theta")
            } else {
                "rope_theta".into()
            };
            return Err((field, format!("is {theta}; expected a positive RoPE base such as 10000")));
        }
        let Some(params) = params else { return Ok(Self { theta, scaling: RopeScaling::None }) };
        if !params.is_object() {
            return Err((field.into(), format!("is {params}; expected an object with a rope_type")));
        }
        if let Some(f) = params.get("partial_rotary_factor").and_then(Value::as_f64).filter(|&f| f != 1.0) {
            return Err((
                format!("{field}.partial_rotary_factor"),
                format!("is {f}; only 1.0 (every channel of a head rotated) is supported"),
            ));
        }
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let number = |key: &str| -> std::result::Result<f64, (String, String)> {
            params.get(key).and_then(Value::as_f64).filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| {
                (
                    format!("{field}.{key}"),
                    format!(
                        "is {}; a {kind} RoPE scaling needs a positive number",
                        params.get(key).unwrap_or(&Value::Null)
                    ),
                )
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: number("factor")? },
            "llama3" => {
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if high <= low {
                    return Err((
                        format!("{field}.high_freq_factor"),
                        format!("is {high}; expected more than low_freq_factor ({low})"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                }
            }
            other => {
                return Err((
                    format!("{field}.rope_type"),
                    format!("is \"{other}\"; supported RoPE types are default, linear and llama3"),
                ))
            }
        };
        Ok(Self { theta, scaling })
    }

    /// The `head_dim / 2` inverse frequencies.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / (self.theta as f32).powf(2.0 * i as f32 / head_dim as f32);
                match self.scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor as f32,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let (factor, low, high, l) = (
                            factor as f32,
                            low_freq_factor as f32,
                            high_freq_factor as f32,
                            original_max_position_embeddings as f32,
                        );
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < l / high {
                            f
                        } else if wavelen > l / low {
                            f / factor
                        } else {
                            let s = (l / wavelen - low) / (high - low);
                            (1.0 - s) * f / factor + s * f
                        }
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's parameters (head_dim 128, theta 500000, factor 8, low 1, high 4, 8192):
    /// the first frequency kept, the last divided, one on the ramp. (The whole model against
    /// transformers: `tests/families.rs`.)
    #[test]
    fn llama3_frequencies() {
        let p = RopeParameters::from_config(
            Some(&serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
            None,
            None,
            10_000.0,
        )
        .unwrap();
        let f = p.inv_freq(128);
        let plain = RopeParameters { theta: 500000.0, scaling: RopeScaling::None }.inv_freq(128);
        assert_eq!(f[0], plain[0]);
        assert!((f[63] - plain[63] / 8.0).abs() <= f32::EPSILON * plain[63]);
        // Index 30: wavelength 2 pi 500000^(30/64) = 2.9k, between 8192 / 4 and 8192: the ramp.
        let w30 = 2.0 * std::f32::consts::PI / plain[30];
        assert!(w30 > 2048.0 && w30 < 8192.0, "{w30}");
        let s = (8192.0 / w30 - 1.0) / 3.0;
        assert!((f[30] - ((1.0 - s) * plain[30] / 8.0 + s * plain[30])).abs() < 1e-9);
    }

    #[test]
    fn unsupported_rope_types_are_named() {
        let e = RopeParameters::from_config(None, None, Some(&serde_json::json!({"type": "yarn", "factor": 4.0})), 1e4)
            .unwrap_err();
        assert_eq!(e.0, "rope_scaling.rope_type");
        assert!(e.1.contains("yarn"), "{}", e.1);
        let old = RopeParameters::from_config(
            None,
            Some(5e5),
            Some(&serde_json::json!({"type": "linear", "factor": 2.0})),
            1e4,
        )
        .unwrap();
        assert_eq!(old, RopeParameters { theta: 5e5, scaling: RopeScaling::Linear { factor: 2.0 } });
    }
}
