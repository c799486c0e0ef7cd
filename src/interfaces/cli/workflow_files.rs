//! `appevents workflow apply` and `workflow export`: workflows as files in a repository.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use super::output::print_json;
use crate::catalog::workflow_files::{self, Change, Document, Format};
use crate::config::Settings;
use crate::store::db;

#[derive(Debug, Args)]
pub(super) struct ApplyArgs {
    /// A workflow file (.yaml, .yml or .json), or a directory of them.
    #[arg(short = 'f', long = "file", value_name = "FILE|DIR")]
    path: PathBuf,
    /// Print what would be created, updated (and which fields) or left unchanged; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(super) struct ExportArgs {
    /// Only the workflow of this key.
    #[arg(long)]
    key: Option<String>,
    /// The directory the files are written to, one KEY.yaml (or KEY.json) per workflow.
    #[arg(short = 'o', long = "output", value_name = "DIR", default_value = ".")]
    output: PathBuf,
    /// Write JSON files instead of YAML.
    #[arg(long)]
    json: bool,
}

pub(super) async fn apply(settings: &Settings, args: ApplyArgs) -> anyhow::Result<()> {
    let documents = read_documents(&args.path)?;
    let pool = db::pool(&settings.database)?;
    let outcomes = workflow_files::apply(&pool, documents, args.dry_run).await?;
    if args.json {
        return print_json(&outcomes);
    }
    for outcome in &outcomes {
        let what = match &outcome.change {
            Change::Created => "created".to_owned(),
            Change::Updated(fields) => format!("updated ({})", fields.join(", ")),
            Change::Unchanged => "unchanged".to_owned(),
        };
        println!(
            "{what}: {} ({}) from {}",
            outcome.key, outcome.name, outcome.origin
        );
    }
    if args.dry_run {
        println!("dry run: nothing was changed");
    }
    Ok(())
}

/// The documents of a file, or of every .yaml, .yml and .json file of a directory (in name
/// order). Every file is read before any is applied: one bad file stops them all.
fn read_documents(path: &Path) -> anyhow::Result<Vec<Document>> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read directory {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && Format::of(&p.to_string_lossy()).is_some())
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{}: no .yaml, .yml or .json file in it", path.display());
        }
        files
    } else {
        vec![path.to_owned()]
    };
    let mut documents = Vec::with_capacity(files.len());
    let mut refused = Vec::new();
    for file in files {
        let origin = file.display().to_string();
        let Some(format) = Format::of(&origin) else {
            bail!("{origin}: a workflow file ends in .yaml, .yml or .json");
        };
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("cannot read {origin}"))?;
        match workflow_files::parse(&origin, &text, format) {
            Ok(document) => documents.push(document),
            Err(message) => refused.push(message),
        }
    }
    if !refused.is_empty() {
        bail!("{}; nothing was applied", refused.join("; "));
    }
    Ok(documents)
}

pub(super) async fn export(settings: &Settings, args: ExportArgs) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let files = workflow_files::export(&pool, args.key.as_deref()).await?;
    let (format, extension) = match args.json {
        true => (Format::Json, "json"),
        false => (Format::Yaml, "yaml"),
    };
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    for file in &files {
        let path = args.output.join(format!("{}.{extension}", file.key));
        let text = workflow_files::render(file, format).map_err(anyhow::Error::msg)?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
