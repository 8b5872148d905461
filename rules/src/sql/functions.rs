//! Built-in functions (I5): the names PostgreSQL 15's `pg_catalog` holds (generated, in
//! `builtins/pg15.txt`), and the families masked sessions may not call, each with the reason
//! written down. A name outside the list is a user-defined function: allowed only through
//! the rules' `functions: allow:`.

use std::collections::HashSet;
use std::sync::OnceLock;

const PG15: &str = include_str!("builtins/pg15.txt");

fn builtins() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| PG15.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect())
}

pub fn is_builtin(name: &str) -> bool {
    builtins().contains(name)
}

/// The denied families: name prefixes or names, and why.
const DENIED: &[(&str, &str)] = &[
    ("query_to_xml", "runs SQL from a string"),
    ("query_to_xmlschema", "runs SQL from a string"),
    ("query_to_xml_and_xmlschema", "runs SQL from a string"),
    ("cursor_to_xml", "reads a cursor's rows by name"),
    ("cursor_to_xmlschema", "reads a cursor's rows by name"),
    ("table_to_xml", "reads a table's rows by name"),
    ("table_to_xmlschema", "reads a table's rows by name"),
    ("table_to_xml_and_xmlschema", "reads a table's rows by name"),
    ("schema_to_xml", "reads every table of a schema"),
    ("schema_to_xmlschema", "reads every table of a schema"),
    ("schema_to_xml_and_xmlschema", "reads every table of a schema"),
    ("database_to_xml", "reads every table of the database"),
    ("database_to_xmlschema", "reads every table of the database"),
    ("database_to_xml_and_xmlschema", "reads every table of the database"),
    ("ts_stat", "runs SQL from a string"),
    ("ts_rewrite", "runs SQL from a string"),
    ("currtid2", "reads a table's rows by name"),
    ("pg_mcv_list_items", "reads column statistics (sample values)"),
    ("pg_read_file", "reads server files"),
    ("pg_read_file_old", "reads server files"),
    ("pg_read_binary_file", "reads server files"),
    ("pg_stat_file", "reads server files"),
    ("pg_ls_", "lists server files"),
    ("lo_import", "reads server files"),
    ("lo_export", "writes server files"),
    ("pg_logical_", "reads the change stream of every table"),
    ("pg_replication_", "administers replication"),
    ("pg_create_logical_replication_slot", "administers replication"),
    ("pg_create_physical_replication_slot", "administers replication"),
    ("pg_copy_logical_replication_slot", "administers replication"),
    ("pg_copy_physical_replication_slot", "administers replication"),
    ("pg_drop_replication_slot", "administers replication"),
    ("pg_reload_conf", "administers the server"),
    ("pg_rotate_logfile", "administers the server"),
    ("pg_promote", "administers the server"),
    ("pg_switch_wal", "administers the server"),
    ("pg_backup_", "administers the server"),
    ("pg_create_restore_point", "administers the server"),
    ("pg_current_logfile", "reveals server files"),
    ("pg_log_backend_memory_contexts", "administers the server"),
    ("pg_import_system_collations", "administers the server"),
    ("binary_upgrade_", "administers the server"),
];

/// Why a built-in is denied, if it is.
pub fn denied(name: &str) -> Option<&'static str> {
    DENIED.iter().find(|(n, _)| if n.ends_with('_') { name.starts_with(n) } else { name == *n }).map(|(_, why)| *why)
}
