//! The sweep's built-in model and data: a randomly initialised byte-level LLaMA and a synthetic
//! corpus of facts, both deterministic in the seed.
//!
//! The corpus is a capacity test: each line ties a made-up name to a place, a number and an
//! object drawn at random, so beyond the (quickly learned) sentence pattern, lowering the
//! training loss means storing more associations, which a higher-rank adapter can do.

use rand::{Rng, SeedableRng};

use crate::models::LlamaConfig;

/// The default built-in model: hidden 256, 4 layers, 4 heads, SwiGLU 512, 256 byte tokens.
pub fn default_model() -> LlamaConfig {
    serde_json::from_str(
        r#"{"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}"#,
    )
    .expect("a valid config")
}

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fu", "ga", "hi", "jo", "ku", "la", "me", "no",
    "pi", "ro", "su", "ta", "wu",
];
const PLACES: [&str; 12] =
    ["Avel", "Brisk", "Corran", "Dunmoor", "Elstow", "Fenwick", "Garth", "Holm", "Istra", "Jorvik", "Kells", "Lunde"];
const OBJECTS: [&str; 10] = ["lamps", "boats", "coins", "maps", "bells", "keys", "drums", "kites", "jars", "ropes"];

fn name(rng: &mut impl Rng) -> String {
    let n = rng.random_range(2..=3);
    let mut s: String = (0..n).map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())]).collect();
    if let Some(first) = s.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    s
}

/// `lines` facts, one per line, e.g. `Kamira of Holm keeps 417 kites.`
pub fn corpus(lines: usize, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..lines)
        .map(|_| {
            let who = name(&mut rng);
            let place = PLACES[rng.random_range(0..PLACES.len())];
            let count: u32 = rng.random_range(10..1000);
            let what = OBJECTS[rng.random_range(0..OBJECTS.len())];
            format!("{who} of {place} keeps {count} {what}.\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_deterministic_and_seeds_differ() {
        assert_eq!(corpus(50, 1), corpus(50, 1));
        assert_ne!(corpus(50, 1), corpus(50, 2));
        let text = corpus(3, 0);
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().all(|l| l.contains(" of ") && l.contains(" keeps ") && l.ends_with('.')), "{text}");
    }
}
