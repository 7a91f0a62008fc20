//! Reading the repository's deployment files (Kubernetes, compose) in tests.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;
use serde_yaml::Value;
use tally::config::PodConfig;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of a file (`---` separated).
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `v[a][b]...`, panicking with the path when absent.
pub fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for (i, k) in path.iter().enumerate() {
        cur = cur
            .get(*k)
            .unwrap_or_else(|| panic!("missing {} in {v:?}", path[..=i].join(".")));
    }
    cur
}

pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

#[derive(Parser)]
struct Only {
    #[command(flatten)]
    pod: PodConfig,
}

/// The `tally run` configuration that these `TALLY_*` variables give, parsed
/// and validated exactly as the binary does. Panics on a variable that
/// `tally run` does not know, so a typo in a manifest cannot pass.
pub fn pod_config_from_env(vars: &[(String, String)]) -> PodConfig {
    let cmd = Only::command();
    let mut argv = vec!["tally".to_string()];
    for (name, value) in vars {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .unwrap_or_else(|| panic!("{name} is not a TALLY_* variable of tally run"));
        let long = arg.get_long().expect("every setting has a long flag");
        argv.push(format!("--{long}={value}"));
    }
    let m = Only::command()
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let cfg = Only::from_arg_matches(&m).unwrap().pod;
    cfg.validate()
        .unwrap_or_else(|e| panic!("{argv:?} does not validate: {e}"));
    cfg
}
