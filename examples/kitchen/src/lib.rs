//! `kitchen`: a pure tool set with rich WIT types and doc comments.
//!
//! Build: `cargo xtask examples`; inspect: `airlock inspect examples/out/kitchen.wasm`.

wit_bindgen::generate!({ path: "wit", world: "kitchen" });

use exports::airlock::kitchen::recipes::{
    Diet, Duration, Filter, Guest as Recipes, Hit, Ingredient, Primitives, Recipe, Stats, Unit,
};

struct Kitchen;

fn book() -> Vec<(Recipe, Duration)> {
    let ing = |name: &str, amount: f64, unit: Unit| Ingredient {
        name: name.into(),
        amount,
        unit,
        note: None,
    };
    vec![
        (
            Recipe {
                title: "Pancakes".into(),
                servings: 4,
                ingredients: vec![
                    ing("flour", 200.0, Unit::Gram),
                    ing("milk", 300.0, Unit::Millilitre),
                    ing("egg", 2.0, Unit::Piece),
                ],
                diet: Diet::VEGETARIAN | Diet::NUT_FREE,
            },
            Duration::Minutes(20),
        ),
        (
            Recipe {
                title: "Overnight oats".into(),
                servings: 1,
                ingredients: vec![
                    ing("oats", 50.0, Unit::Gram),
                    ing("oat milk", 150.0, Unit::Millilitre),
                ],
                diet: Diet::VEGETARIAN | Diet::VEGAN | Diet::NUT_FREE,
            },
            Duration::Overnight,
        ),
        (
            Recipe {
                title: "Lentil soup".into(),
                servings: 6,
                ingredients: vec![
                    ing("lentils", 400.0, Unit::Gram),
                    ing("cumin", 2.0, Unit::Teaspoon),
                ],
                diet: Diet::VEGETARIAN | Diet::VEGAN | Diet::GLUTEN_FREE | Diet::NUT_FREE,
            },
            Duration::HoursAndMinutes((1, 10)),
        ),
    ]
}

fn minutes(d: &Duration) -> u32 {
    match d {
        Duration::Minutes(m) => *m,
        Duration::HoursAndMinutes((h, m)) => u32::from(*h) * 60 + u32::from(*m),
        Duration::Overnight => 12 * 60,
    }
}

impl Recipes for Kitchen {
    fn scale(recipe: Recipe, servings: u16) -> Result<Recipe, String> {
        if recipe.servings == 0 {
            return Err("the recipe has 0 servings and cannot be scaled".into());
        }
        let f = f64::from(servings) / f64::from(recipe.servings);
        Ok(Recipe {
            servings,
            ingredients: recipe
                .ingredients
                .into_iter()
                .map(|i| Ingredient {
                    amount: i.amount * f,
                    ..i
                })
                .collect(),
            ..recipe
        })
    }

    fn search(filter: Filter) -> Vec<Hit> {
        let text = filter.text.to_lowercase();
        let mut hits: Vec<Hit> = book()
            .into_iter()
            .filter(|(r, _)| r.diet.contains(filter.diet))
            .filter(|(_, d)| {
                filter
                    .max_time
                    .as_ref()
                    .is_none_or(|m| minutes(d) <= minutes(m))
            })
            .filter_map(|(r, time)| {
                let title = r.title.to_lowercase();
                let score = if title.contains(&text) {
                    1.0
                } else if r.ingredients.iter().any(|i| i.name.contains(&text)) {
                    0.5
                } else {
                    0.0
                };
                (score > 0.0).then_some(Hit {
                    title: r.title,
                    score,
                    time,
                })
            })
            .collect();
        hits.truncate(filter.limit as usize);
        hits
    }

    fn summarize(values: Vec<f64>) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        Some(Stats {
            count: values.len() as u64,
            min,
            max,
            mean,
        })
    }

    fn echo_primitives(p: Primitives) -> Primitives {
        p
    }

    #[allow(clippy::type_complexity)]
    fn echo_shapes(
        d: Duration,
        u: Unit,
        f: Diet,
        o: Option<Option<u8>>,
        r: Result<(), String>,
        t: (String, i64),
    ) -> (
        Duration,
        Unit,
        Diet,
        Option<Option<u8>>,
        Result<(), String>,
        (String, i64),
    ) {
        (d, u, f, o, r, t)
    }
}

impl Guest for Kitchen {
    fn greet(name: String, excited: Option<bool>) -> String {
        if excited.unwrap_or(false) {
            format!("Hello, {name}!")
        } else {
            format!("Hello, {name}.")
        }
    }
}

export!(Kitchen);
