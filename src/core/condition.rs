//! Conditions: Common Expression Language (CEL) expressions over the event, the outputs of
//! earlier steps and a `for_each` element, e.g. `payload.plan == "pro" && payload.email != ""`
//! or `steps.find.totalSize == 0`.
//!
//! An expression is compiled and its references checked when the workflow is defined
//! ([`Condition::compile`]): a syntax error, a variable that is not part of the event, a step
//! that does not run before it, or `item` outside a `for_each` is refused then. Evaluating it
//! on real data can still fail (comparing a string with a number): [`Condition::evaluate`]
//! returns that error, and the run fails permanently with it.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr};
use cel::{Context, Env, Program, Value as CelValue};
use serde_json::{Map, Value};

use crate::core::mapping::Scope;

/// The variables a condition may read besides `steps` and `item`.
const EVENT_VARIABLES: &[&str] = &["id", "name", "user_id", "occurred_at", "payload"];

/// CEL's standard environment, built once per process.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// What a condition may refer to where it is written.
#[derive(Debug, Clone, Copy)]
pub struct Allowed<'a> {
    /// The steps that run before it, in order.
    pub earlier: &'a [&'a str],
    /// Every step of the workflow, to tell "a later step" from "no such step".
    pub all: &'a [&'a str],
    /// `item` is defined (the step has a `for_each`).
    pub item: bool,
}

/// A compiled condition.
#[derive(Clone)]
pub struct Condition {
    source: String,
    program: Arc<Program>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Condition({:?})", self.source)
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Condition {
    pub fn compile(source: &str, allowed: Allowed<'_>) -> Result<Condition, String> {
        let source = source.trim();
        if source.is_empty() {
            return Err("the condition is empty".into());
        }
        let program = ENV.compile(source).map_err(|e| {
            format!(
                "{source:?} is not a valid CEL expression: {}",
                one_line(&e.to_string())
            )
        })?;
        let mut reads = Reads::default();
        walk(&program.expression().expr, &mut Vec::new(), &mut reads);
        for variable in &reads.variables {
            let known = EVENT_VARIABLES.contains(&variable.as_str())
                || variable == "steps"
                || (variable == "item" && allowed.item);
            if known {
                continue;
            }
            return Err(if variable == "item" {
                format!("{source:?} reads item, which only a step with for_each has")
            } else {
                format!(
                    "{source:?} reads {variable}, which is not defined: use id, name, user_id, occurred_at, payload, steps{}",
                    if allowed.item { " or item" } else { "" }
                )
            });
        }
        if reads.whole_steps {
            return Err(format!(
                "{source:?} reads steps as a whole: name the step, as in steps.NAME.field"
            ));
        }
        for step in &reads.steps {
            if allowed.earlier.contains(&step.as_str()) {
                continue;
            }
            return Err(if allowed.all.contains(&step.as_str()) {
                format!("{source:?} reads step {step}, which does not run before it")
            } else {
                format!("{source:?} reads step {step}, which the workflow does not have")
            });
        }
        Ok(Condition {
            source: source.to_owned(),
            program: Arc::new(program),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the condition. An error (a type mismatch, a missing field, a result that is
    /// not a boolean) is said in one line naming the expression.
    pub fn evaluate(&self, scope: &Scope<'_>) -> Result<bool, String> {
        let mut context = Context::with_env(ENV.clone());
        let event = scope.event;
        let text = |s: &str| CelValue::from(s.to_owned());
        context.add_variable_from_value("id", text(&event.id));
        context.add_variable_from_value("name", text(&event.name));
        context.add_variable_from_value("user_id", text(&event.user_id));
        context.add_variable_from_value(
            "occurred_at",
            event.occurred_at.as_deref().map_or(CelValue::Null, text),
        );
        context.add_variable_from_value("payload", to_cel(&Value::Object(event.payload.clone())));
        let empty = Map::new();
        context.add_variable_from_value(
            "steps",
            to_cel(&Value::Object(scope.steps.unwrap_or(&empty).clone())),
        );
        if let Some(item) = scope.item {
            context.add_variable_from_value("item", to_cel(item));
        }
        // The interpreter is a dependency: whatever it does on strange data, a run fails,
        // the worker does not.
        let program = self.program.clone();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.execute(&context)))
                .map_err(|_| format!("condition {:?} could not be evaluated", self.source))?;
        match result {
            Ok(CelValue::Bool(value)) => Ok(value),
            Ok(other) => Err(format!(
                "condition {:?} gave {}, not a boolean",
                self.source,
                kind(&other)
            )),
            Err(err) => Err(format!(
                "condition {:?} failed: {}",
                self.source,
                one_line(&err.to_string())
            )),
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn kind(value: &CelValue) -> &'static str {
    match value {
        CelValue::Null => "null",
        CelValue::Int(_) | CelValue::UInt(_) | CelValue::Float(_) => "a number",
        CelValue::String(_) => "a string",
        CelValue::List(_) => "a list",
        CelValue::Map(_) => "a map",
        _ => "a value",
    }
}

/// JSON as CEL sees it: integers stay integers (CEL's `int`), other numbers are doubles.
fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => CelValue::Int(i),
            None => match n.as_u64() {
                Some(u) => CelValue::UInt(u),
                None => CelValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
        },
        Value::String(s) => CelValue::from(s.clone()),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => CelValue::from(
            map.iter()
                .map(|(k, v)| (k.clone(), to_cel(v)))
                .collect::<std::collections::HashMap<String, CelValue>>(),
        ),
    }
}

/// What an expression reads: its free variables and the steps it names.
#[derive(Default)]
struct Reads {
    variables: HashSet<String>,
    steps: HashSet<String>,
    /// `steps` used other than as `steps.NAME`.
    whole_steps: bool,
}

/// Walks the expression; `bound` are the variables a macro (`exists`, `map`, ...) binds.
fn walk(expr: &Expr, bound: &mut Vec<String>, reads: &mut Reads) {
    let free = |name: &str, bound: &Vec<String>| !bound.iter().any(|b| b == name);
    match expr {
        Expr::Ident(name) => {
            if free(name, bound) {
                if name == "steps" {
                    reads.whole_steps = true;
                }
                reads.variables.insert(name.clone());
            }
        }
        Expr::Select(select) => {
            if let Expr::Ident(name) = &select.operand.expr
                && name == "steps"
                && free(name, bound)
            {
                reads.variables.insert(name.clone());
                reads.steps.insert(select.field.clone());
                return;
            }
            walk(&select.operand.expr, bound, reads);
        }
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(&target.expr, bound, reads);
            }
            for arg in &call.args {
                walk(&arg.expr, bound, reads);
            }
        }
        Expr::Comprehension(comprehension) => {
            walk(&comprehension.iter_range.expr, bound, reads);
            walk(&comprehension.accu_init.expr, bound, reads);
            let before = bound.len();
            bound.push(comprehension.iter_var.clone());
            if let Some(second) = &comprehension.iter_var2 {
                bound.push(second.clone());
            }
            bound.push(comprehension.accu_var.clone());
            walk(&comprehension.loop_cond.expr, bound, reads);
            walk(&comprehension.loop_step.expr, bound, reads);
            walk(&comprehension.result.expr, bound, reads);
            bound.truncate(before);
        }
        Expr::List(list) => {
            for element in &list.elements {
                walk(&element.expr, bound, reads);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(e) => {
                        walk(&e.key.expr, bound, reads);
                        walk(&e.value.expr, bound, reads);
                    }
                    EntryExpr::StructField(f) => walk(&f.value.expr, bound, reads),
                }
            }
        }
        Expr::Struct(structure) => {
            for entry in &structure.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    walk(&f.value.expr, bound, reads);
                }
            }
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    use crate::core::event::test_event as event;

    const NONE: Allowed<'static> = Allowed {
        earlier: &[],
        all: &[],
        item: false,
    };

    #[test]
    fn conditions_read_the_event_and_earlier_steps() {
        let pro = Condition::compile(r#"payload.plan == "pro" && payload.email != """#, NONE)
            .expect("compiles");
        let event_pro = event(json!({"plan": "pro", "email": "a@x.test"}));
        let event_free = event(json!({"plan": "free", "email": "a@x.test"}));
        assert_eq!(pro.evaluate(&Scope::event(&event_pro)), Ok(true));
        assert_eq!(pro.evaluate(&Scope::event(&event_free)), Ok(false));

        let allowed = Allowed {
            earlier: &["find"],
            all: &["find", "create"],
            item: false,
        };
        let none_found =
            Condition::compile("steps.find.totalSize == 0", allowed).expect("compiles");
        let steps = json!({"find": {"totalSize": 0, "records": []}});
        let scope = Scope {
            event: &event_pro,
            steps: steps.as_object(),
            item: None,
        };
        assert_eq!(none_found.evaluate(&scope), Ok(true));
    }

    #[test]
    fn macros_bind_their_own_variables() {
        let vip =
            Condition::compile(r#"payload.tags.exists(t, t == "vip")"#, NONE).expect("compiles");
        let tagged = event(json!({"tags": ["new", "vip"]}));
        assert_eq!(vip.evaluate(&Scope::event(&tagged)), Ok(true));
    }

    #[test]
    fn bad_conditions_are_refused_when_defined() {
        let allowed = Allowed {
            earlier: &["find"],
            all: &["find", "create", "later"],
            item: false,
        };
        let refused = |source: &str| Condition::compile(source, allowed).expect_err(source);
        assert!(refused("payload.plan ==").contains("is not a valid CEL expression"));
        assert!(refused("env.HOME == \"x\"").contains("reads env, which is not defined"));
        assert!(
            refused("steps.nope.id == \"x\"")
                .contains("reads step nope, which the workflow does not have")
        );
        assert!(
            refused("steps.later.id == \"x\"")
                .contains("reads step later, which does not run before it")
        );
        assert!(refused("item.id == 1").contains("only a step with for_each"));
        assert!(refused("size(steps) == 1").contains("name the step"));
        assert!(refused("  ").contains("empty"));
    }

    #[test]
    fn an_evaluation_error_is_an_error_not_a_panic() {
        let adult = Condition::compile("payload.age >= 18", NONE).expect("compiles");
        let text_age = event(json!({"age": "eighteen"}));
        let err = adult
            .evaluate(&Scope::event(&text_age))
            .expect_err("type mismatch");
        assert!(
            err.starts_with("condition \"payload.age >= 18\" failed"),
            "{err}"
        );
        let missing = event(json!({}));
        assert!(adult.evaluate(&Scope::event(&missing)).is_err());
        let not_bool = Condition::compile("payload.age", NONE).expect("compiles");
        assert_eq!(
            not_bool.evaluate(&Scope::event(&event(json!({"age": 3})))),
            Err("condition \"payload.age\" gave a number, not a boolean".into())
        );
    }
}
