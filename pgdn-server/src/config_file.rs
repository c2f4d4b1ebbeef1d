//! The binary's configuration file (`--config pgdn.toml`) and
//! `--print-config`; a module of `main.rs`, not of the library.
//!
//! Nothing here knows pgdn's settings: every long flag of the clap
//! [`Command`] is a key of the file (`redis-url = "..."`,
//! `max-connections = 10000`, lists as arrays, durations as `"30s"`), so a
//! flag added to `main.rs` is a key at once. A file value becomes the flag's
//! clap *default*, which clap ranks below the environment variable and the
//! command line: flag > environment > file > built-in default. Each value
//! is checked first with the flag's own value parser, so a wrong one is
//! refused naming the key, never echoing a secret.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use pgdn_server::Error;

/// Id and long flag of the file's path.
const CONFIG: &str = "config";
/// Id and long flag of "print the effective configuration and exit".
const PRINT_CONFIG: &str = "print-config";
/// What a secret is printed as.
const MASK: &str = "***";

/// Parses the command line of `T` with the configuration file under it:
/// exits on `--help`, a usage error, a bad file (status 1, naming the key),
/// or after `--print-config` (status 0).
pub fn parse_or_exit<T: clap::Parser>() -> T {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match parse_from(T::command(), &argv) {
        Ok((matches, cmd)) if matches.get_flag(PRINT_CONFIG) => {
            print!("{}", print(&cmd, &matches));
            std::process::exit(0)
        }
        Ok((matches, mut cmd)) => {
            T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
        }
        Err(Failure::Clap(e)) => e.exit(),
        Err(Failure::Config(e)) => {
            eprintln!("pgdn-server: {e}");
            std::process::exit(1)
        }
    }
}

/// Why the command line or the file was refused.
enum Failure {
    /// A usage error, `--help` or `--version`: clap prints and exits.
    Clap(clap::Error),
    /// The configuration file is unreadable or wrong; the message names the
    /// file and the key.
    Config(Error),
}

impl From<clap::Error> for Failure {
    fn from(e: clap::Error) -> Self {
        Failure::Clap(e)
    }
}

/// `cmd` with `--config` and `--print-config`, parsed from `argv` with the
/// file's values under the environment and the flags; with the command
/// that parsed them, for error messages.
fn parse_from(cmd: Command, argv: &[OsString]) -> Result<(ArgMatches, Command), Failure> {
    let cmd = cmd
        .arg(
            Arg::new(CONFIG)
                .long(CONFIG)
                .env("PGDN_CONFIG")
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .global(true)
                .help(
                    "TOML file of settings, keyed by these flags' long names \
                     (e.g. `max-connections = 10000`); flags and variables override it",
                ),
        )
        .arg(
            Arg::new(PRINT_CONFIG)
                .long(PRINT_CONFIG)
                .action(ArgAction::SetTrue)
                .help("Print the effective configuration as TOML (secrets masked) and exit"),
        );
    let settings = match config_path(&cmd, argv) {
        Some(path) => Settings::load(&cmd, &path).map_err(Failure::Config)?,
        None => Settings::default(),
    };
    // A file value yields to a conflicting flag or variable (a file's
    // `jwt-secret` to `--jwt-secret-file`): drop it and parse again.
    let mut dropped = HashSet::new();
    loop {
        let with_file = settings.apply(cmd.clone(), &dropped);
        let matches = with_file.clone().try_get_matches_from(argv)?;
        let overridden = settings.overridden(&with_file, &matches, &dropped);
        if overridden.is_empty() {
            return Ok((matches, with_file));
        }
        dropped.extend(overridden);
    }
}

/// The `--config` path (flag or `PGDN_CONFIG`), read with errors ignored:
/// the real parse, after the file is applied, reports them.
fn config_path(cmd: &Command, argv: &[OsString]) -> Option<PathBuf> {
    let matches = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(argv)
        .ok()?;
    // `--config` is global: it may also follow a subcommand.
    let mut m = &matches;
    let mut path = m.get_one::<PathBuf>(CONFIG).cloned();
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
        if let Ok(Some(p)) = m.try_get_one::<PathBuf>(CONFIG) {
            path = Some(p.clone());
        }
    }
    path
}

/// The long flags a file may set: every flag of the top-level command but
/// help, version and the file's own.
fn keys(cmd: &Command) -> impl Iterator<Item = (&str, &Arg)> {
    cmd.get_arguments().filter_map(|arg| {
        let long = arg.get_long()?;
        let own = matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        ) || long == CONFIG
            || long == PRINT_CONFIG;
        (!own).then_some((long, arg))
    })
}

/// What a flag's values are, for checking a TOML value's type and printing.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A switch without a value (`ArgAction::SetTrue`/`SetFalse`).
    Switch,
    /// A `bool` value (`--demo-page true`).
    Bool,
    /// An integer.
    Integer,
    /// A floating-point number.
    Float,
    /// Text or a path: only a TOML string is accepted.
    Text,
    /// Anything else (addresses, durations, networks): a string, parsed
    /// by the flag's value parser.
    Other,
}

impl Kind {
    fn of(arg: &Arg) -> Kind {
        use std::any::TypeId;
        if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            return Kind::Switch;
        }
        if matches!(arg.get_action(), ArgAction::Count) {
            return Kind::Integer;
        }
        let ty = arg.get_value_parser().type_id();
        let is = |ids: &[TypeId]| ids.iter().any(|id| ty == *id);
        if is(&[TypeId::of::<bool>()]) {
            Kind::Bool
        } else if is(&[
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<isize>(),
        ]) {
            Kind::Integer
        } else if is(&[TypeId::of::<f32>(), TypeId::of::<f64>()]) {
            Kind::Float
        } else if is(&[
            TypeId::of::<String>(),
            TypeId::of::<PathBuf>(),
            TypeId::of::<OsString>(),
        ]) {
            Kind::Text
        } else {
            Kind::Other
        }
    }
}

/// Whether the flag takes a list (a `Vec` field: the flag repeated).
fn is_list(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// The configuration file's values, checked against the command.
#[derive(Default)]
struct Settings {
    /// The file, for messages.
    path: PathBuf,
    /// Long flag and its values as command-line text, in file order.
    values: Vec<(String, Vec<String>)>,
}

impl Settings {
    /// Reads and checks the file at `path` against `cmd`'s flags.
    fn load(cmd: &Command, path: &Path) -> Result<Settings, Error> {
        let where_ = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read config file {where_}: {e}")))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // The message and position only: the error's own rendering
            // quotes the line, which may hold a secret.
            let line = e
                .span()
                .map(|s| format!(" at line {}", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            Error::Config(format!(
                "config file {where_}{line}: {}",
                e.message().trim_end()
            ))
        })?;
        let keys: Vec<(&str, &Arg)> = keys(cmd).collect();
        let mut values = Vec::new();
        for (key, value) in &table {
            let err = |m: String| Error::Config(format!("config file {where_}: `{key}`: {m}"));
            let Some(&(long, arg)) = keys.iter().find(|(long, _)| long == key) else {
                let hint = closest(key, keys.iter().map(|(long, _)| *long))
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                return Err(Error::Config(format!(
                    "config file {where_}: unknown key `{key}`{hint}; keys are the long flags of --help"
                )));
            };
            let items = match value {
                toml::Value::Array(items) if is_list(arg) => items.iter().collect(),
                toml::Value::Array(_) => {
                    return Err(err("expected one value, found an array".into()));
                }
                single => vec![single],
            };
            let kind = Kind::of(arg);
            let texts = items
                .into_iter()
                .map(|item| text_of(item, kind).map_err(&err))
                .collect::<Result<Vec<_>, _>>()?;
            check_values(arg, &texts).map_err(err)?;
            values.push((long.to_string(), texts));
        }
        let settings = Settings {
            path: path.to_path_buf(),
            values,
        };
        settings.check_conflicts(cmd)?;
        Ok(settings)
    }

    /// Refuses two keys whose flags clap would refuse together.
    fn check_conflicts(&self, cmd: &Command) -> Result<(), Error> {
        for (i, (a, _)) in self.values.iter().enumerate() {
            for (b, _) in &self.values[i + 1..] {
                let (Some(arg_a), Some(arg_b)) = (find_long(cmd, a), find_long(cmd, b)) else {
                    continue;
                };
                if conflict(cmd, arg_a, arg_b) {
                    return Err(Error::Config(format!(
                        "config file {}: `{a}` and `{b}` cannot both be set",
                        self.path.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// `cmd` with the file's values as the defaults of their flags (in
    /// subcommands too, where a flag has the same long name), except those
    /// `dropped` (command name, long flag).
    fn apply(&self, cmd: Command, dropped: &HashSet<(String, String)>) -> Command {
        let name = cmd.get_name().to_string();
        // `mut_args` keeps the flags' order (`mut_arg` moves one to the end).
        let mut cmd = cmd.mut_args(|arg| {
            let Some(long) = arg.get_long() else {
                return arg;
            };
            if dropped.contains(&(name.clone(), long.to_string())) {
                return arg;
            }
            match self.values.iter().find(|(key, _)| key == long) {
                Some((_, values)) => {
                    // A secret's default never shows in --help.
                    let secret = is_secret(&arg);
                    arg.default_values(values.iter().cloned())
                        .hide_default_value(secret)
                }
                None => arg,
            }
        });
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        for name in names {
            cmd = cmd.mut_subcommand(name, |sub| self.apply(sub, dropped));
        }
        cmd
    }

    /// The file's values (command name, long flag) that a flag or variable
    /// conflicting with them overrides.
    fn overridden(
        &self,
        cmd: &Command,
        matches: &ArgMatches,
        dropped: &HashSet<(String, String)>,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (long, _) in &self.values {
            let key = (cmd.get_name().to_string(), long.clone());
            let Some(arg) = find_long(cmd, long) else {
                continue;
            };
            if dropped.contains(&key)
                || matches.value_source(arg.get_id().as_str()) != Some(ValueSource::DefaultValue)
            {
                continue;
            }
            let explicit = cmd.get_arguments().any(|other| {
                matches!(
                    matches.value_source(other.get_id().as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                ) && conflict(cmd, arg, other)
            });
            if explicit {
                out.push(key);
            }
        }
        if let Some((name, sub_matches)) = matches.subcommand()
            && let Some(sub) = cmd.find_subcommand(name)
        {
            out.extend(self.overridden(sub, sub_matches, dropped));
        }
        out
    }
}

/// The argument of `cmd` whose long flag is `long`.
fn find_long<'a>(cmd: &'a Command, long: &str) -> Option<&'a Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(long))
}

/// Whether clap refuses `a` and `b` together (either may name the other).
fn conflict(cmd: &Command, a: &Arg, b: &Arg) -> bool {
    let names = |x: &Arg, y: &Arg| {
        cmd.get_arg_conflicts_with(x)
            .iter()
            .any(|c| c.get_id() == y.get_id())
    };
    a.get_id() != b.get_id() && (names(a, b) || names(b, a))
}

/// A TOML scalar as command-line text, refusing a type the flag cannot
/// take. The message never quotes the value (it may be a secret).
fn text_of(value: &toml::Value, kind: Kind) -> Result<String, String> {
    use toml::Value;
    let expected = match kind {
        Kind::Switch | Kind::Bool => "a boolean",
        Kind::Integer => "an integer",
        Kind::Float => "a number",
        Kind::Text | Kind::Other => "a string",
    };
    let found = match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    };
    let text = match (value, kind) {
        (Value::Boolean(b), Kind::Switch | Kind::Bool) => b.to_string(),
        (Value::Integer(i), Kind::Integer | Kind::Float) => i.to_string(),
        (Value::Float(f), Kind::Float) => f.to_string(),
        // A flag parsed by its own parser may take a string ("64KiB").
        (Value::String(s), Kind::Integer | Kind::Float | Kind::Text | Kind::Other) => s.clone(),
        (Value::Integer(i), Kind::Other) => i.to_string(),
        _ => return Err(format!("expected {expected}, found {found}")),
    };
    Ok(text)
}

/// Checks `values` with the flag's own value parser (in a command of that
/// flag alone), so that a bad value is refused naming the file's key
/// rather than as a flag the user never typed.
fn check_values(arg: &Arg, values: &[String]) -> Result<(), String> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return Ok(()); // `text_of` took a boolean.
    }
    let id = arg.get_id().clone();
    let mut probe = Arg::new(id)
        .long("value")
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone())
        .allow_hyphen_values(true);
    if let Some(delimiter) = arg.get_value_delimiter() {
        probe = probe.value_delimiter(delimiter);
    }
    if let Some(n) = arg.get_num_args() {
        probe = probe.num_args(n);
    }
    let argv =
        std::iter::once("config".to_string()).chain(values.iter().map(|v| format!("--value={v}")));
    let result = Command::new("config").arg(probe).try_get_matches_from(argv);
    match result {
        Ok(_) => Ok(()),
        // The parser's reason (e.g. "invalid digit found in string"); a
        // secret's parser accepts any text, so this never quotes one.
        Err(e) => Err(match std::error::Error::source(&e) {
            Some(reason) if !is_secret(arg) => format!("invalid value: {reason}"),
            _ => format!("invalid value ({})", e.kind()),
        }),
    }
}

/// The known key closest to `key` (a typo's), if any is close.
fn closest<'a>(key: &str, keys: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    keys.map(|k| (strsim::jaro(key, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Whether the flag holds a secret: its environment value is hidden in
/// --help, or its name says so. A `-file` flag holds a path.
fn is_secret(arg: &Arg) -> bool {
    let long = arg.get_long().unwrap_or_default();
    if long.ends_with("-file") || long.ends_with("-path") {
        return false;
    }
    arg.is_hide_env_values_set()
        || ["secret", "key", "password", "token"]
            .iter()
            .any(|word| long.split('-').any(|part| part == *word))
}

/// The value as printed: a URL's credentials masked, a secret masked whole.
fn masked(arg: &Arg, value: &str) -> String {
    if let Some(scheme_end) = value.find("://") {
        let rest = &value[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{}{MASK}{}", &value[..scheme_end + 3], &rest[at..]);
        }
        // A URL without credentials (a redis URL is hidden in --help for
        // its password only).
        let named_secret = is_secret(arg) && !arg.is_hide_env_values_set();
        if !named_secret {
            return value.to_string();
        }
    }
    if is_secret(arg) {
        MASK.to_string()
    } else {
        value.to_string()
    }
}

/// The effective configuration of the top-level command as a TOML file
/// that `--config` takes back: each flag with its help as a comment, an
/// unset one commented out, secrets masked.
fn print(cmd: &Command, matches: &ArgMatches) -> String {
    let mut out = String::from(
        "# pgdn-server's effective configuration (flags > environment > config file > defaults).\n\
         # Secrets are masked as \"***\": put them back (or use the -file flags) before using it.\n",
    );
    for (long, arg) in keys(cmd) {
        out.push('\n');
        if let Some(help) = arg.get_help() {
            for line in help.to_string().lines() {
                out.push_str(&format!("# {line}\n"));
            }
        }
        let raw: Vec<String> = matches
            .try_get_raw(arg.get_id().as_str())
            .ok()
            .flatten()
            .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if raw.is_empty() && !is_list(arg) {
            out.push_str(&format!("# {long} =\n"));
            continue;
        }
        let kind = Kind::of(arg);
        let typed: Vec<toml::Value> = raw
            .iter()
            .map(|v| {
                let shown = masked(arg, v);
                if shown != *v {
                    return toml::Value::String(shown);
                }
                match kind {
                    Kind::Switch | Kind::Bool => v.parse().map(toml::Value::Boolean).ok(),
                    Kind::Integer => v.parse().map(toml::Value::Integer).ok(),
                    Kind::Float => v.parse().map(toml::Value::Float).ok(),
                    Kind::Text | Kind::Other => None,
                }
                .unwrap_or_else(|| toml::Value::String(v.clone()))
            })
            .collect();
        let value = if is_list(arg) {
            toml::Value::Array(typed)
        } else {
            typed.into_iter().next().expect("a value")
        };
        out.push_str(&format!("{long} = {value}\n"));
    }
    out
}
