//! The relay driven by scripted frame sequences, with no sockets: what reaches the server and
//! the client, the audit events, and the requests to the driver.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, reason = "test code")]

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::Relay;
use crate::protocol::{Direction, Frame, decode, messages};

const RULES: &str = include_str!("../../../../rules/testdata/valid/spec-example.yaml");
const CUSTOMERS: u32 = 16_384;

// ---- frames ------------------------------------------------------------------------------

fn frame(tag: u8, body: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    messages::tagged(&mut b, tag, body);
    Frame::from_encoded(b.freeze()).unwrap()
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn q(sql: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, sql);
    frame(b'Q', &b)
}

fn parse(name: &str, sql: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.put_u16(0);
    frame(b'P', &b)
}

fn bind(portal: &str, stmt: &str, result_formats: &[i16]) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.put_u16(0);
    b.put_u16(0);
    b.put_u16(u16::try_from(result_formats.len()).unwrap());
    for f in result_formats {
        b.put_i16(*f);
    }
    frame(b'B', &b)
}

fn describe(kind: u8, name: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    cstr(&mut b, name);
    frame(b'D', &b)
}

fn close(kind: u8, name: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    cstr(&mut b, name);
    frame(b'C', &b)
}

fn execute(portal: &str, max: i32) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, portal);
    b.put_i32(max);
    frame(b'E', &b)
}

fn sync() -> Frame {
    frame(b'S', &[])
}

fn empty(tag: u8) -> Frame {
    frame(tag, &[])
}

/// RowDescription of (name, table oid, attnum) text columns.
fn row_desc(fields: &[(&str, u32, i16)]) -> Frame {
    let mut b = BytesMut::new();
    b.put_u16(u16::try_from(fields.len()).unwrap());
    for (name, oid, attnum) in fields {
        cstr(&mut b, name);
        b.put_u32(*oid);
        b.put_i16(*attnum);
        b.put_u32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
    }
    frame(b'T', &b)
}

fn data_row(cells: &[&str]) -> Frame {
    let mut b = BytesMut::new();
    b.put_u16(u16::try_from(cells.len()).unwrap());
    for c in cells {
        b.put_i32(i32::try_from(c.len()).unwrap());
        b.put_slice(c.as_bytes());
    }
    frame(b'D', &b)
}

fn complete(tag: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, tag);
    frame(b'C', &b)
}

fn ready() -> Frame {
    frame(b'Z', b"I")
}

fn server_error(code: &str, message: &str) -> Frame {
    let mut b = BytesMut::new();
    for (t, v) in [(b'S', "ERROR"), (b'C', code), (b'M', message)] {
        b.put_u8(t);
        cstr(&mut b, v);
    }
    b.put_u8(0);
    frame(b'E', &b)
}

fn notification(channel: &str, payload: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_u32(4242);
    cstr(&mut b, channel);
    cstr(&mut b, payload);
    frame(b'A', &b)
}

fn parameter_status(name: &str, value: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, name);
    cstr(&mut b, value);
    frame(b'S', &b)
}

fn sqlstate_of(f: &Frame) -> String {
    messages::error_fields(f)
        .unwrap()
        .iter()
        .find(|(t, _)| *t == b'C')
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn text_of(f: &Frame) -> String {
    String::from_utf8_lossy(f.body_ref()).into_owned()
}

// ---- the harness ---------------------------------------------------------------------------

struct Harness {
    relay: Relay,
    catalog: Arc<rules::catalog::Catalog>,
}

fn harness(roles: &[&str]) -> Harness {
    harness_with(RULES, roles, |_| {})
}

fn harness_with(rules_yaml: &str, roles: &[&str], adjust: impl FnOnce(&mut crate::config::Config)) -> Harness {
    let (relay, catalog) = super::offline(rules_yaml, roles, adjust).unwrap();
    Harness { relay, catalog }
}

fn frames(buf: &mut BytesMut, dir: Direction) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = decode(buf, dir).unwrap() {
        out.push(f);
    }
    assert!(buf.is_empty(), "whole frames only");
    out
}

impl Harness {
    /// A client message; Query and Parse texts are decided against the example catalog.
    fn client(&mut self, f: Frame) -> bool {
        let text = match f.tag() {
            b'Q' => messages::query_text(&f).map(<[u8]>::to_vec),
            b'P' => messages::parse_message(&f).map(|(_, s)| s.to_vec()),
            _ => None,
        };
        let decided =
            text.map(|t| self.relay.rules_mut().decide_offline(&self.catalog, std::str::from_utf8(&t).unwrap()));
        self.relay.on_client(f, decided).unwrap()
    }

    /// A client message with a decision made beforehand (shared, as the cache shares them).
    fn client_decided(&mut self, f: Frame, decided: super::Decided) -> bool {
        self.relay.on_client(f, Some(decided)).unwrap()
    }

    fn clients(&mut self, fs: Vec<Frame>) {
        for f in fs {
            assert!(self.client(f));
        }
    }

    fn server(&mut self, fs: Vec<Frame>) {
        for f in fs {
            self.relay.on_server(f).unwrap();
        }
    }

    fn server_result(&mut self, fs: Vec<Frame>) -> Result<(), crate::session::SessionError> {
        fs.into_iter().try_for_each(|f| self.relay.on_server(f))
    }

    fn sent(&mut self) -> Vec<Frame> {
        frames(self.relay.for_server(), Direction::FromClient)
    }

    fn received(&mut self) -> Vec<Frame> {
        frames(self.relay.for_client(), Direction::FromServer)
    }

    fn received_tags(&mut self) -> String {
        self.received().iter().map(|f| char::from(f.tag())).collect()
    }

    fn events(&mut self) -> Vec<String> {
        self.relay
            .take_events()
            .into_iter()
            .map(|a| serde_json::to_value(&a.event).unwrap()["event"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn tags(fs: &[Frame]) -> String {
    fs.iter().map(|f| char::from(f.tag())).collect()
}

const APP: &[&str] = &["app_user"];

// ---- simple protocol -----------------------------------------------------------------------

#[test]
fn an_unprotected_query_is_forwarded_byte_for_byte() {
    let mut h = harness(APP);
    // Names already pinned to their schemas: nothing to rewrite.
    let f = q("SELECT id, amount FROM public.orders WHERE id = 1");
    let raw = f.as_bytes().clone();
    h.client(f);
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].as_bytes(), &raw);
    h.server(vec![
        row_desc(&[("id", 16_385, 1), ("amount", 16_385, 3)]),
        data_row(&["1", "1.25"]),
        complete("SELECT 1"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "TDCZ");
}

#[test]
fn a_protected_read_is_sent_substituted() {
    let mut h = harness(APP);
    h.client(q("SELECT ssn FROM customers WHERE id = 1"));
    let sent = text_of(&h.sent()[0]);
    assert!(
        sent.contains("FROM (SELECT customers.id, CAST(")
            && sent.contains(" AS ssn FROM")
            && sent.contains("AS customers"),
        "{sent}"
    );
}

#[test]
fn a_blocked_query_fails_on_the_server_too_and_the_client_gets_42501_and_one_ready() {
    let mut h = harness(APP);
    h.client(q("SELECT id FROM customers WHERE ssn = '1'"));
    let sent = h.sent();
    assert!(text_of(&sent[0]).contains("PGVEIL BLOCKED STATEMENT"));
    assert_eq!(h.events(), ["query_blocked"]);
    h.server(vec![server_error("42601", "syntax error at or near \"PGVEIL\""), ready()]);
    let got = h.received();
    assert_eq!(tags(&got), "EZ");
    assert_eq!(sqlstate_of(&got[0]), "42501");
}

#[test]
fn a_multi_statement_query_with_a_server_error_ends_with_one_ready() {
    let mut h = harness(APP);
    h.client(q("SELECT 1; SELECT 1/0"));
    h.server(vec![
        row_desc(&[("?column?", 0, 0)]),
        data_row(&["1"]),
        complete("SELECT 1"),
        server_error("22012", "division by zero"),
        ready(),
    ]);
    let got = h.received();
    assert_eq!(tags(&got), "TDCEZ");
    assert_eq!(sqlstate_of(&got[3]), "22012");
}

#[test]
fn an_empty_query_is_answered_as_the_server_answers() {
    let mut h = harness(APP);
    h.client(q(""));
    h.server(vec![empty(b'I'), ready()]);
    assert_eq!(h.received_tags(), "IZ");
}

#[test]
fn a_syntax_error_is_the_servers_42601_not_a_policy_block() {
    let mut h = harness(APP);
    h.client(q("SELEC 1"));
    assert!(h.events().is_empty(), "not audited as a block");
    h.server(vec![server_error("42601", "syntax error at or near \"SELEC\""), ready()]);
    let got = h.received();
    assert_eq!(sqlstate_of(&got[0]), "42601");
}

#[test]
fn a_simple_query_without_row_description_is_refused() {
    let mut h = harness(APP);
    h.client(q("SELECT 1"));
    assert!(h.server_result(vec![data_row(&["1"])]).is_err(), "rows nothing described never reach the client (I1)");
}

#[test]
fn an_answer_to_nothing_ends_the_session() {
    let mut h = harness(APP);
    assert!(h.server_result(vec![empty(b'1')]).is_err());
    let mut h = harness(APP);
    assert!(h.server_result(vec![ready()]).is_err());
}

#[test]
fn terminate_is_forwarded_and_ends_the_relay() {
    let mut h = harness(APP);
    assert!(!h.client(empty(b'X')));
    assert_eq!(tags(&h.sent()), "X");
}

// ---- extended protocol ---------------------------------------------------------------------

#[test]
fn parse_bind_describe_execute_sync() {
    let mut h = harness(APP);
    h.clients(vec![
        parse("", "SELECT id FROM orders WHERE id = $1"),
        bind("", "", &[]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
    ]);
    assert_eq!(tags(&h.sent()), "PBDES");
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        row_desc(&[("id", 16_385, 1)]),
        data_row(&["1"]),
        complete("SELECT 1"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "12TDCZ");
}

#[test]
fn a_describe_less_execute_gets_an_injected_describe_whose_answer_is_swallowed() {
    let mut h = harness(APP);
    h.clients(vec![parse("", "SELECT id FROM orders"), bind("", "", &[]), execute("", 0), sync()]);
    let sent = h.sent();
    assert_eq!(tags(&sent), "PBDES", "Describe('P') injected before Execute");
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        row_desc(&[("id", 16_385, 1)]),
        data_row(&["7"]),
        complete("SELECT 1"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "12DCZ", "the injected Describe's answer is not the client's");
}

#[test]
fn errors_before_sync_skip_the_rest_of_the_pipeline() {
    let mut h = harness(APP);
    h.clients(vec![
        parse("a", "SELECT 1/0"),
        bind("", "a", &[]),
        describe(b'P', ""),
        execute("", 0),
        parse("b", "SELECT 2"),
        bind("", "b", &[]),
        execute("", 0),
        sync(),
    ]);
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        row_desc(&[("?column?", 0, 0)]),
        server_error("22012", "division by zero"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "12TEZ");
    // The session goes on: the queue is empty again, a new statement works.
    h.clients(vec![parse("", "SELECT 3"), bind("", "", &[]), describe(b'P', ""), execute("", 0), sync()]);
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        row_desc(&[("?column?", 0, 0)]),
        data_row(&["3"]),
        complete("SELECT 1"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "12TDCZ");
}

#[test]
fn a_blocked_parse_in_the_middle_of_a_batch_fails_alone_up_to_sync() {
    let mut h = harness(APP);
    h.clients(vec![
        parse("ok", "SELECT id FROM orders"),
        sync(),
        parse("bad", "SELECT id FROM customers WHERE ssn = $1"),
        bind("", "bad", &[]),
        execute("", 0),
        sync(),
        parse("", "SELECT 1"),
        sync(),
    ]);
    let sent = h.sent();
    assert_eq!(tags(&sent), "PSPBDESPS", "a Describe injected before the Execute");
    assert!(text_of(&sent[2]).contains("PGVEIL BLOCKED STATEMENT"));
    h.server(vec![empty(b'1'), ready(), server_error("42601", "syntax error"), ready(), empty(b'1'), ready()]);
    let got = h.received();
    assert_eq!(tags(&got), "1ZEZ1Z");
    assert_eq!(sqlstate_of(&got[2]), "42501");
    assert_eq!(h.events(), ["query_blocked"]);
}

#[test]
fn portal_suspension_and_a_second_execute() {
    let mut h = harness(APP);
    h.clients(vec![
        parse("", "SELECT id FROM orders"),
        bind("p", "", &[]),
        describe(b'P', "p"),
        execute("p", 2),
        sync(),
    ]);
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        row_desc(&[("id", 16_385, 1)]),
        data_row(&["1"]),
        data_row(&["2"]),
        empty(b's'),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "12TDDsZ");
    h.clients(vec![execute("p", 2), sync()]);
    h.server(vec![data_row(&["3"]), complete("SELECT 1"), ready()]);
    assert_eq!(h.received_tags(), "DCZ", "the portal's row plan is kept across Executes");
}

#[test]
fn portals_are_forgotten_once_no_name_or_pending_answer_refers_to_them() {
    let mut h = harness(APP);
    h.clients(vec![parse("s", "SELECT id FROM orders"), sync()]);
    h.server(vec![empty(b'1'), ready()]);
    for _ in 0..3 {
        h.clients(vec![bind("", "s", &[]), describe(b'P', ""), execute("", 0), sync()]);
        h.server(vec![empty(b'2'), row_desc(&[("id", 16_385, 1)]), complete("SELECT 0"), ready()]);
        assert_eq!(h.relay.portals.len(), 1, "only the portal the unnamed name denotes");
    }
    // More named portals than the in-place scan handles: the sets' path keeps them all.
    let names: Vec<String> = (0..super::SMALL + 4).map(|i| format!("c{i}")).collect();
    h.clients(names.iter().map(|n| bind(n, "s", &[])).chain([sync()]).collect());
    h.server(names.iter().map(|_| empty(b'2')).chain([ready()]).collect());
    assert_eq!(h.relay.portals.len(), names.len() + 1);
    h.clients(names.iter().map(|n| close(b'P', n)).chain([sync()]).collect());
    h.server(names.iter().map(|_| empty(b'3')).chain([ready()]).collect());
    assert_eq!(h.relay.portals.len(), 1, "closed portals are forgotten");
    // A portal whose name now denotes another, with its Execute still owed, is kept until
    // that answer came.
    h.clients(vec![bind("", "s", &[]), sync(), describe(b'P', ""), execute("", 0), bind("", "s", &[]), sync()]);
    h.server(vec![empty(b'2'), ready()]);
    assert_eq!(h.relay.portals.len(), 2, "the renamed portal's answers are still owed");
    h.server(vec![row_desc(&[("id", 16_385, 1)]), complete("SELECT 0"), empty(b'2'), ready()]);
    assert_eq!(h.relay.portals.len(), 1);
}

#[test]
fn close_while_rows_are_in_flight() {
    let mut h = harness(APP);
    h.clients(vec![
        parse("s", "SELECT id FROM orders"),
        bind("p", "s", &[]),
        describe(b'P', "p"),
        execute("p", 0),
        close(b'P', "p"),
        close(b'S', "s"),
        sync(),
    ]);
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        row_desc(&[("id", 16_385, 1)]),
        data_row(&["1"]),
        data_row(&["2"]),
        complete("SELECT 2"),
        empty(b'3'),
        empty(b'3'),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "12TDDC33Z");
    // The statement is gone: binding it now has no plan, and its rows would be refused.
    h.clients(vec![bind("", "s", &[]), execute("", 0), sync()]);
    h.server(vec![server_error("26000", "prepared statement \"s\" does not exist"), ready()]);
    assert_eq!(h.received_tags(), "EZ");
}

#[test]
fn a_statement_described_once_serves_later_binds() {
    let mut h = harness(APP);
    h.clients(vec![parse("s", "SELECT id FROM orders"), describe(b'S', "s"), sync()]);
    h.server(vec![empty(b'1'), frame(b't', &[0, 0]), row_desc(&[("id", 16_385, 1)]), ready()]);
    assert_eq!(h.received_tags(), "1tTZ");
    h.clients(vec![bind("", "s", &[0]), execute("", 0), sync()]);
    assert_eq!(tags(&h.sent()), "PDSBES", "no Describe injected: the statement's description is known");
    h.server(vec![empty(b'2'), data_row(&["9"]), complete("SELECT 1"), ready()]);
    assert_eq!(h.received_tags(), "2DCZ");
}

#[test]
fn describe_of_a_statement_without_rows_is_no_data() {
    let mut h = harness(APP);
    h.clients(vec![parse("u", "UPDATE orders SET status = 'x' WHERE id = 1"), describe(b'S', "u"), sync()]);
    h.server(vec![empty(b'1'), frame(b't', &[0, 0]), empty(b'n'), ready()]);
    assert_eq!(h.received_tags(), "1tnZ");
}

#[test]
fn a_rewritten_parse_keeps_its_name_and_parameter_types() {
    let mut h = harness(APP);
    let mut b = BytesMut::new();
    cstr(&mut b, "named");
    cstr(&mut b, "SELECT ssn FROM customers WHERE id = $1");
    b.put_u16(1);
    b.put_u32(23);
    h.client(frame(b'P', &b));
    let sent = h.sent();
    let (name, sql) = messages::parse_message(&sent[0]).unwrap();
    assert_eq!(name, b"named");
    assert!(std::str::from_utf8(sql).unwrap().contains("(SELECT"));
    assert!(messages::parse_rest(&sent[0]).unwrap().ends_with(&[0, 1, 0, 0, 0, 23]));
}

#[test]
fn a_parse_of_an_existing_name_keeps_the_old_plan() {
    let mut h = harness(&["analyst"]);
    // The first definition has a row limit (analyst's rule on customers).
    h.clients(vec![parse("s", "SELECT id FROM customers WHERE id > 0"), sync()]);
    h.server(vec![empty(b'1'), ready()]);
    h.received();
    // The server refuses a second Parse of "s"; the proxy keeps the first plan too.
    h.clients(vec![parse("s", "SELECT id FROM orders"), sync()]);
    h.server(vec![server_error("42P05", "prepared statement \"s\" already exists"), ready()]);
    h.received();
    let plan = &h.relay.statements.get(&Bytes::from_static(b"s")).unwrap().plan;
    assert!(plan.max_rows.is_some(), "the first definition's plan stays");
}

#[test]
fn a_parse_after_a_close_of_the_same_name_redefines_it() {
    let mut h = harness(&["analyst"]);
    h.clients(vec![parse("s", "SELECT id FROM customers WHERE id > 0"), sync()]);
    h.server(vec![empty(b'1'), ready()]);
    h.clients(vec![close(b'S', "s"), parse("s", "SELECT id FROM orders"), sync()]);
    h.server(vec![empty(b'3'), empty(b'1'), ready()]);
    assert_eq!(h.received_tags(), "1Z31Z");
    let plan = &h.relay.statements.get(&Bytes::from_static(b"s")).unwrap().plan;
    assert!(plan.max_rows.is_none(), "the new definition's plan");
}

#[test]
fn several_syncs_get_one_ready_each() {
    let mut h = harness(APP);
    h.clients(vec![sync(), sync(), sync()]);
    h.server(vec![ready(), ready(), ready()]);
    assert_eq!(h.received_tags(), "ZZZ");
    assert!(h.server_result(vec![ready()]).is_err(), "a fourth ReadyForQuery answers nothing");
}

#[test]
fn flush_is_forwarded_without_an_expected_answer() {
    let mut h = harness(APP);
    h.clients(vec![parse("", "SELECT 1"), empty(b'H')]);
    assert_eq!(tags(&h.sent()), "PH");
    h.server(vec![empty(b'1')]);
    assert_eq!(h.received_tags(), "1");
}

#[test]
fn rows_of_a_portal_on_an_unknown_statement_are_refused_for_masked_sessions() {
    let mut h = harness(APP);
    h.clients(vec![bind("", "never_parsed", &[]), describe(b'P', ""), execute("", 0), sync()]);
    h.server(vec![empty(b'2'), row_desc(&[("ssn", CUSTOMERS, 4)])]);
    assert!(h.server_result(vec![data_row(&["900-00-0001"])]).is_err());
}

// ---- SQL PREPARE / EXECUTE / DEALLOCATE ----------------------------------------------------

#[test]
fn sql_prepare_carries_its_row_limit_to_protocol_binds_of_its_name() {
    let mut h = harness(&["analyst"]);
    h.client(q("PREPARE big AS SELECT id FROM customers WHERE id > 0"));
    h.server(vec![complete("PREPARE"), ready()]);
    assert!(h.relay.sql_prepared.get("big").and_then(|p| p.plan.max_rows.clone()).is_some());
    h.clients(vec![bind("", "big", &[]), describe(b'P', ""), execute("", 0), sync()]);
    let mut answer = vec![empty(b'2'), row_desc(&[("id", CUSTOMERS, 1)])];
    answer.extend((0..1001).map(|i| data_row(&[&i.to_string()])));
    h.server(answer);
    assert!(h.relay.take_cancel(), "the cut cancels the backend's work");
    let got = h.received();
    assert_eq!(got.iter().filter(|f| f.tag() == b'D').count(), 1000);
}

#[test]
fn deallocate_forgets_and_protocol_parse_of_the_name_is_independent() {
    let mut h = harness(&["analyst"]);
    h.client(q("PREPARE p1 AS SELECT id FROM customers WHERE id > 0"));
    h.server(vec![complete("PREPARE"), ready()]);
    h.clients(vec![parse("p2", "SELECT 1"), sync()]);
    h.server(vec![empty(b'1'), ready()]);
    h.client(q("DEALLOCATE p1"));
    h.server(vec![complete("DEALLOCATE"), ready()]);
    assert!(!h.relay.sql_prepared.contains_key("p1"));
    assert!(h.relay.statements.contains_key(&Bytes::from_static(b"p2")), "protocol statements are not SQL ones");
    h.client(q("DEALLOCATE ALL"));
    assert!(h.relay.sql_prepared.is_empty());
}

#[test]
fn a_simple_query_cut_by_max_rows_hides_the_rest_up_to_ready() {
    let mut h = harness(&["analyst"]);
    h.client(q("SELECT id FROM customers WHERE id > 0"));
    let mut answer = vec![row_desc(&[("id", CUSTOMERS, 1)])];
    answer.extend((0..1005).map(|i| data_row(&[&i.to_string()])));
    answer.extend([complete("SELECT 1005"), ready()]);
    h.server(answer);
    let got = h.received();
    assert_eq!(got.iter().filter(|f| f.tag() == b'D').count(), 1000);
    let last_two: String = tags(&got[got.len() - 2..]);
    assert_eq!(last_two, "EZ", "the cut's error, then the one ReadyForQuery");
    assert_eq!(h.events(), ["row_limit"]);
    assert!(h.relay.take_cancel());
    assert!(h.relay.take_ready());
}

// ---- COPY ----------------------------------------------------------------------------------

#[test]
fn copy_out_is_relayed() {
    let mut h = harness(APP);
    h.client(q("COPY orders TO STDOUT"));
    h.server(vec![
        frame(b'H', &[0, 0, 0]),
        frame(b'd', b"1\t2\n"),
        frame(b'd', b"3\t4\n"),
        empty(b'c'),
        complete("COPY 2"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "HddcCZ");
}

#[test]
fn copy_in_is_relayed_both_ways() {
    let mut h = harness(APP);
    h.client(q("COPY orders (id, customer_id, amount, status) FROM STDIN"));
    h.server(vec![frame(b'G', &[0, 0, 0])]);
    assert_eq!(h.received_tags(), "G");
    h.clients(vec![frame(b'd', b"9\t1\t1.00\topen\n"), empty(b'c')]);
    assert_eq!(tags(&h.sent()), "Qdc");
    h.server(vec![complete("COPY 1"), ready()]);
    assert_eq!(h.received_tags(), "CZ");
}

#[test]
fn copy_fail_from_the_client_is_relayed() {
    let mut h = harness(APP);
    h.client(q("COPY orders FROM STDIN"));
    h.server(vec![frame(b'G', &[0, 0, 0])]);
    h.clients(vec![frame(b'f', b"client gave up\0")]);
    h.server(vec![server_error("57014", "COPY from stdin failed: client gave up"), ready()]);
    assert_eq!(h.received_tags(), "GEZ");
}

#[test]
fn copy_to_of_a_protected_table_is_substituted() {
    let mut h = harness(APP);
    h.client(q("COPY customers TO STDOUT"));
    let sent = text_of(&h.sent()[0]);
    assert!(sent.contains("COPY (SELECT"), "{sent}");
}

// ---- asynchronous messages -----------------------------------------------------------------

#[test]
fn notifications_and_notices_between_messages_are_relayed() {
    let mut h = harness(APP);
    h.server(vec![notification("jobs", "42")]);
    assert_eq!(h.received_tags(), "A", "a notification with nothing in flight");
    h.client(q("SELECT 1"));
    let mut notice = BytesMut::new();
    for (t, v) in [(b'S', "NOTICE"), (b'C', "00000"), (b'M', "hello")] {
        notice.put_u8(t);
        cstr(&mut notice, v);
    }
    notice.put_u8(0);
    h.server(vec![
        frame(b'N', &notice),
        row_desc(&[("?column?", 0, 0)]),
        notification("jobs", "43"),
        data_row(&["1"]),
        complete("SELECT 1"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "NTADCZ");
}

#[test]
fn a_pinned_setting_changed_under_a_masked_session_ends_it() {
    let mut h = harness(APP);
    assert!(h.server_result(vec![parameter_status("standard_conforming_strings", "off")]).is_err());
    let mut h = harness(APP);
    assert!(h.server_result(vec![parameter_status("client_encoding", "SJIS")]).is_err());
    let mut h = harness(APP);
    h.server(vec![parameter_status("DateStyle", "German, DMY")]);
    assert_eq!(h.received_tags(), "S", "other settings are relayed");
}

// ---- the result layers ---------------------------------------------------------------------

#[test]
fn substituted_masked_columns_report_their_origin() {
    let mut h = harness(APP);
    h.client(q("SELECT ssn FROM customers WHERE id = 1"));
    // The server describes the masked expression with no origin.
    h.server(vec![row_desc(&[("ssn", 0, 0)]), data_row(&["***-**-0001"]), complete("SELECT 1"), ready()]);
    let got = h.received();
    let fields = messages::row_description(&got[0]).unwrap();
    assert_eq!((fields[0].table_oid, fields[0].attnum), (CUSTOMERS, 4), "as PostgreSQL reports it without pgveil");
    assert!(h.events().is_empty(), "no backstop: the cell was already masked");
}

#[test]
fn the_backstop_masks_a_raw_value_that_reached_it_and_reports_it() {
    let mut h = harness(APP);
    h.client(q("SELECT 1"));
    // A result claiming a protected origin: the second layer masks it, counts and audits.
    h.server(vec![row_desc(&[("ssn", CUSTOMERS, 4)]), data_row(&["900-00-0001"]), complete("SELECT 1"), ready()]);
    let got = h.received();
    let cell = messages::first_cell(&got[1]).unwrap().to_vec();
    assert_eq!(cell, b"***-**-0001");
    assert_eq!(h.events(), ["backstop"]);
    assert_eq!(h.relay.shared.metrics.backstop_masked_cells_total.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn a_remembered_row_plan_still_masks_and_is_not_reused_across_analyses() {
    let mut h = harness(APP);
    let remembered = |h: &Harness| h.relay.plan_memo.as_ref().map(|m| Arc::as_ptr(&m.plan));
    // One analysis (as the cache hands out for texts of one shape), the same description
    // twice: the second result reuses the first plan, and its cell is still masked.
    let decided = h.relay.rules_mut().decide_offline(&h.catalog, "SELECT 1");
    let mut plans = Vec::new();
    for _ in 0..2 {
        h.client_decided(q("SELECT 1"), decided.clone());
        h.server(vec![row_desc(&[("ssn", CUSTOMERS, 4)]), data_row(&["900-00-0001"]), complete("SELECT 1"), ready()]);
        let got = h.received();
        assert_eq!(messages::first_cell(&got[1]).unwrap(), b"***-**-0001");
        plans.push(remembered(&h));
    }
    assert!(plans[0].is_some() && plans[0] == plans[1], "the plan was reused");
    // Another analysis with the same description is planned anew (and masked all the same).
    h.client(q("SELECT 1"));
    h.server(vec![row_desc(&[("ssn", CUSTOMERS, 4)]), data_row(&["900-00-0002"]), complete("SELECT 1"), ready()]);
    assert_eq!(messages::first_cell(&h.received()[1]).unwrap(), b"***-**-0002");
    assert_ne!(remembered(&h), plans[0]);
    // Another description for the same analysis is not the remembered one: `name` is not
    // masked for this role.
    h.client_decided(q("SELECT 1"), decided);
    h.server(vec![row_desc(&[("name", CUSTOMERS, 2)]), data_row(&["Ada"]), complete("SELECT 1"), ready()]);
    assert_eq!(messages::first_cell(&h.received()[1]).unwrap(), b"Ada");
}

#[test]
fn a_remembered_portal_row_plan_still_masks_and_follows_its_statement_and_description() {
    let mut h = harness(APP);
    let remembered = |h: &Harness| h.relay.portal_memo.as_ref().map(|m| Arc::as_ptr(&m.plan));
    let execute_once = |h: &mut Harness, stmt: &str, desc: (&str, u32, i16), cell: &str| {
        h.clients(vec![bind("", stmt, &[]), describe(b'P', ""), execute("", 0), sync()]);
        h.server(vec![empty(b'2'), row_desc(&[desc]), data_row(&[cell]), complete("SELECT 1"), ready()]);
        let got = h.received();
        messages::first_cell(&got[2]).unwrap().to_vec()
    };
    h.clients(vec![parse("s1", "SELECT 1"), parse("s2", "SELECT 2"), sync()]);
    h.server(vec![empty(b'1'), empty(b'1'), ready()]);
    h.received();
    // One statement executed twice with the same description (as PQexecPrepared does): the
    // second execution reuses the plan, and a cell claiming a protected origin is still masked.
    let mut plans = Vec::new();
    for _ in 0..2 {
        assert_eq!(execute_once(&mut h, "s1", ("ssn", CUSTOMERS, 4), "900-00-0001"), b"***-**-0001");
        plans.push(remembered(&h));
    }
    assert!(plans[0].is_some() && plans[0] == plans[1], "the plan was reused");
    // Another statement with the same description is planned anew, masked all the same.
    assert_eq!(execute_once(&mut h, "s2", ("ssn", CUSTOMERS, 4), "900-00-0002"), b"***-**-0002");
    assert_ne!(remembered(&h), plans[0]);
    // Another description of the first statement is not the remembered one: `name` is not
    // masked for this role.
    assert_eq!(execute_once(&mut h, "s1", ("name", CUSTOMERS, 2), "Ada"), b"Ada");
    assert_eq!(execute_once(&mut h, "s1", ("ssn", CUSTOMERS, 4), "900-00-0003"), b"***-**-0003");
}

#[test]
fn an_exempt_session_is_observed_never_blocked_or_masked() {
    let mut h = harness_with(RULES, &["dba"], |c| c.audit.raw_access = true);
    let f = q("DO $$ BEGIN PERFORM 1; END $$");
    let raw = f.as_bytes().clone();
    h.client(f);
    assert_eq!(h.sent()[0].as_bytes(), &raw, "forwarded as written");
    h.server(vec![complete("DO"), ready()]);
    h.client(q("SELEC 1"));
    assert_eq!(text_of(&h.sent()[0]), "SELEC 1\0", "the server answers its syntax errors");
    h.server(vec![server_error("42601", "syntax error"), ready()]);
    h.received();
    h.client(q("SELECT ssn FROM customers WHERE id = 1"));
    h.server(vec![row_desc(&[("ssn", CUSTOMERS, 4)]), data_row(&["900-00-0001"]), complete("SELECT 1"), ready()]);
    let got = h.received();
    assert_eq!(messages::first_cell(&got[1]).unwrap(), b"900-00-0001");
    assert_eq!(h.events(), ["raw_access"]);
}

#[test]
fn raw_access_counts_the_rows_of_command_complete() {
    let mut h = harness_with(RULES, &["billing_admin"], |c| c.audit.raw_access = true);
    h.clients(vec![
        parse("", "SELECT ssn FROM customers WHERE id < $1"),
        bind("", "", &[]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
    ]);
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        row_desc(&[("ssn", CUSTOMERS, 4)]),
        data_row(&["a"]),
        data_row(&["b"]),
        complete("SELECT 2"),
        ready(),
    ]);
    let evs = h.relay.take_events();
    assert_eq!(evs.len(), 1);
    let v = serde_json::to_value(&evs[0].event).unwrap();
    assert_eq!(v["event"], "raw_access");
    assert_eq!(v["rows"], 2);
    assert_eq!(v["statement"], "SELECT ssn FROM customers WHERE id < $1");
    assert!(!evs[0].wait, "result events do not hold the session");
}

#[test]
fn masked_reads_write_no_raw_access() {
    let mut h = harness_with(RULES, APP, |c| c.audit.raw_access = true);
    h.client(q("SELECT ssn FROM customers WHERE id = 1"));
    h.server(vec![row_desc(&[("ssn", 0, 0)]), data_row(&["***-**-0001"]), complete("SELECT 1"), ready()]);
    assert!(h.events().is_empty());
}

#[test]
fn raw_access_is_off_unless_configured() {
    let mut h = harness(&["billing_admin"]);
    h.client(q("SELECT ssn FROM customers WHERE id = 1"));
    h.server(vec![row_desc(&[("ssn", CUSTOMERS, 4)]), data_row(&["x"]), complete("SELECT 1"), ready()]);
    assert!(h.events().is_empty());
}

#[test]
fn the_function_call_message_is_refused_for_masked_sessions() {
    let mut h = harness(APP);
    h.client(frame(b'F', &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]));
    assert!(text_of(&h.sent()[0]).contains("PGVEIL BLOCKED STATEMENT"));
    // Audited with a statement and a fingerprint of its own (issue 30): function OID 1, no
    // arguments; another function gets another fingerprint.
    let evs = h.relay.take_events();
    let ev = &evs.first().unwrap().event;
    assert_eq!(ev.statement.as_deref(), Some("FunctionCall(function oid 1, 0 arguments)"));
    let fp = ev.fingerprint.clone().unwrap();
    assert_eq!(fp.len(), 16);
    assert_ne!(fp, crate::audit::function_call_fingerprint(2, 0));
    assert_eq!(fp, crate::audit::function_call_fingerprint(1, 0));
    h.server(vec![server_error("42601", "syntax error"), ready()]);
    let got = h.received();
    assert_eq!(sqlstate_of(&got[0]), "42501");
}

#[test]
fn monitor_mode_lets_the_statement_run_and_flags_it() {
    let rules = RULES.replace("    max_rows: 1000", "    max_rows: 1000\n    mode: monitor");
    let mut h = harness_with(&rules, &["analyst"], |_| {});
    h.client(q("SELECT * FROM customers WHERE id = 1"));
    assert!(!text_of(&h.sent()[0]).contains("PGVEIL BLOCKED"));
    assert_eq!(h.events(), ["query_flagged"]);
}

#[test]
fn the_probe_budget_is_spent_by_policy_blocks_only() {
    let mut h = harness_with(RULES, APP, |c| {
        c.limits.blocks_per_session = Some(crate::config::Budget { max: 2, per: std::time::Duration::from_secs(60) });
    });
    for _ in 0..5 {
        h.client(q("SELEC 1"));
    }
    assert!(!h.relay.over_budget(), "syntax errors are not probes");
    h.client(q("SELECT id FROM customers WHERE ssn = '1'"));
    h.client(q("SELECT id FROM customers WHERE ssn = '2'"));
    assert!(!h.relay.over_budget());
    h.client(q("SELECT id FROM customers WHERE ssn = '3'"));
    assert!(h.relay.over_budget(), "the third block within a minute");
    assert!(h.relay.budget_reason().contains("limits.blocks_per_session"));
}

#[test]
fn the_statement_that_spends_the_budget_never_runs_and_earlier_answers_still_come() {
    let mut h = harness_with(RULES, APP, |c| {
        c.limits.blocks_per_session = Some(crate::config::Budget { max: 1, per: std::time::Duration::from_secs(60) });
    });
    h.client(q("SELECT id FROM customers WHERE ssn = '1'"));
    assert_eq!(tags(&h.sent()), "Q");
    // The server fails the stand-in; a client that reads answers in order (tokio-postgres)
    // sends its next statement on the 42501, before the ReadyForQuery has come.
    h.server(vec![server_error("42601", "syntax error at or near \"PGVEIL\"")]);
    assert_eq!(h.received_tags(), "E");
    h.client(q("SELECT id FROM customers WHERE ssn = '2'"));
    assert!(h.relay.over_budget());
    assert!(h.relay.forget_from_trip(), "the first statement's ReadyForQuery is still owed");
    assert!(h.sent().is_empty(), "the statement that spent the budget is never sent");
    assert!(h.relay.awaiting_server());
    h.server(vec![ready()]);
    assert_eq!(h.received_tags(), "Z", "the owed ReadyForQuery, and nothing for the second statement");
    assert!(!h.relay.awaiting_server());

    // A pipeline left without Sync: nothing more would come, so nothing is waited for.
    let mut h = harness_with(RULES, APP, |c| {
        c.limits.blocks_per_session = Some(crate::config::Budget { max: 0, per: std::time::Duration::from_secs(60) });
    });
    h.client(parse("", "SELECT id FROM orders WHERE id = $1"));
    h.client(parse("s2", "SELECT id FROM customers WHERE ssn = $1"));
    assert!(h.relay.over_budget());
    assert!(!h.relay.forget_from_trip());
    assert_eq!(tags(&h.sent()), "P", "the Parse before the one that spent the budget");
}

#[test]
fn a_set_search_path_is_followed_once_the_server_confirms_it() {
    let mut h = harness(APP);
    h.client(q("SET search_path = crm"));
    h.server(vec![complete("SET"), ready()]);
    h.received();
    // `customers` is now crm.customers, which no rule protects: forwarded pinned to it.
    let f = q("SELECT ssn FROM customers");
    with_crm(&mut h);
    h.client(f);
    assert_eq!(text_of(h.sent().last().unwrap()).trim_end_matches('\0'), "SELECT ssn FROM crm.customers");
}

/// The example catalog with an unprotected `crm.customers` (id, ssn).
fn with_crm(h: &mut Harness) {
    let crm =
        rules::catalog::Relation::text_table(20_000, rules::TableName::new("crm", "customers"), ["ssn".to_owned()]);
    let catalog = rules::catalog::Catalog::new(h.catalog.relations().map(|r| (**r).clone()).chain([crm]));
    h.catalog = Arc::new(catalog);
}

/// BEGIN; SET search_path = crm; then `end`, which the server answers ROLLBACK (a COMMIT
/// answered so is a COMMIT of a failed transaction).
fn in_transaction(h: &mut Harness, end: &str) {
    for (sql, tag, status) in
        [("BEGIN", "BEGIN", b"T"), ("SET search_path = crm", "SET", b"T"), (end, "ROLLBACK", b"I")]
    {
        h.client(q(sql));
        h.server(vec![complete(tag), frame(b'Z', status)]);
        h.received();
    }
}

fn sent_text(h: &mut Harness) -> String {
    text_of(h.sent().last().unwrap()).trim_end_matches('\0').to_owned()
}

#[test]
fn a_rolled_back_set_search_path_is_undone() {
    let mut h = harness(APP);
    with_crm(&mut h);
    in_transaction(&mut h, "ROLLBACK");
    h.client(q("SELECT ssn FROM customers"));
    assert!(
        sent_text(&mut h).contains("FROM public.customers AS customers) AS customers"),
        "back to public: {}",
        sent_text(&mut h)
    );
    // A COMMIT of a failed transaction is a rollback (the server says so in its tag).
    h.server(vec![complete("SELECT 0"), ready()]);
    h.received();
    in_transaction(&mut h, "COMMIT");
    h.client(q("SELECT ssn FROM customers"));
    assert!(sent_text(&mut h).contains("FROM public.customers AS customers) AS customers"), "{}", sent_text(&mut h));
}

#[test]
fn a_set_in_an_implicit_transaction_that_failed_is_undone() {
    let mut h = harness(APP);
    with_crm(&mut h);
    h.client(q("SET search_path = crm; SELECT 1/0"));
    h.server(vec![complete("SET"), server_error("22012", "division by zero"), ready()]);
    h.received();
    h.client(q("SELECT ssn FROM customers"));
    assert!(sent_text(&mut h).contains("FROM public.customers AS customers) AS customers"), "{}", sent_text(&mut h));
}

#[test]
fn each_statement_of_a_query_is_decided_after_the_ones_before_it() {
    let mut h = harness(APP);
    with_crm(&mut h);
    h.client(q("SET search_path = crm; SELECT ssn FROM customers; RESET search_path; SELECT id FROM orders"));
    assert_eq!(
        sent_text(&mut h),
        "SET search_path = crm; SELECT ssn FROM crm.customers; RESET search_path; SELECT id FROM public.orders"
    );
    // And the session follows once the server ran them.
    h.server(vec![complete("SET"), complete("SELECT 0"), complete("RESET"), complete("SELECT 0"), ready()]);
    h.received();
    h.client(q("SET search_path = crm"));
    h.server(vec![complete("SET"), ready()]);
    h.received();
    h.client(q("SELECT ssn FROM customers"));
    assert_eq!(sent_text(&mut h), "SELECT ssn FROM crm.customers");
}

#[test]
fn error_positions_in_rewritten_text_are_mapped_back() {
    let mut h = harness(APP);
    let sql = "SELECT ssn, nosuch FROM customers";
    h.client(q(sql));
    let sent = text_of(&h.sent()[0]);
    let at = sent.find("nosuch").unwrap() + 1;
    let mut b = BytesMut::new();
    for (t, v) in [
        (b'S', "ERROR".to_owned()),
        (b'C', "42703".to_owned()),
        (b'M', "column \"nosuch\" does not exist".to_owned()),
        (b'P', at.to_string()),
    ] {
        b.put_u8(t);
        cstr(&mut b, &v);
    }
    b.put_u8(0);
    h.server(vec![frame(b'E', &b), ready()]);
    let got = h.received();
    let fields = messages::error_fields(&got[0]).unwrap();
    let position = fields.iter().find(|(t, _)| *t == b'P').map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    assert_eq!(position, Some((sql.find("nosuch").unwrap() + 1).to_string()), "the client's own coordinates");
}

#[test]
fn a_query_or_parse_without_a_decision_is_refused() {
    let mut h = harness(APP);
    assert!(h.relay.on_client(q("SELECT 1"), None).is_err(), "fail closed: nothing undecided is sent");
    assert!(h.sent().is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]
    /// The `relay` fuzz target's invariants over random message sequences (one ReadyForQuery
    /// per accepted one and at most one per Sync; no unplanned DataRow of a masked session).
    #[test]
    fn random_message_sequences_keep_the_relay_invariants(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..900)) {
        crate::fuzz::relay(&data);
    }
}

#[test]
fn a_sql_cursor_executed_as_a_portal_returns_its_rows() {
    let mut h = harness(APP);
    h.clients(vec![
        parse("", "BEGIN"),
        bind("", "", &[]),
        execute("", 0),
        parse("", "DECLARE c CURSOR FOR SELECT id FROM orders"),
        bind("", "", &[]),
        execute("", 0),
        execute("c", 2),
        sync(),
    ]);
    // Each Execute gets a Describe of its own, whose answer the client never sees.
    assert_eq!(tags(&h.sent()), "PBDEPBDEDES");
    h.server(vec![
        empty(b'1'),
        empty(b'2'),
        empty(b'n'),
        complete("BEGIN"),
        empty(b'1'),
        empty(b'2'),
        empty(b'n'),
        complete("DECLARE CURSOR"),
        row_desc(&[("id", 16_385, 1)]),
        data_row(&["1"]),
        data_row(&["2"]),
        empty(b's'),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "12C12CDDsZ");
}

#[test]
fn a_bind_the_server_refused_leaves_no_portal_behind() {
    let mut h = harness(APP);
    h.clients(vec![bind("c", "nosuch", &[]), sync()]);
    h.sent();
    h.server(vec![server_error("26000", "prepared statement \"nosuch\" does not exist"), ready()]);
    h.received();
    // "c" is now the server's cursor, not the portal the failed Bind would have made.
    h.clients(vec![q("BEGIN; DECLARE c CURSOR FOR SELECT id FROM orders")]);
    h.sent();
    h.server(vec![complete("BEGIN"), complete("DECLARE CURSOR"), ready()]);
    h.received();
    h.clients(vec![execute("c", 0), sync()]);
    assert_eq!(tags(&h.sent()), "DES");
    h.server(vec![row_desc(&[("id", 16_385, 1)]), data_row(&["1"]), complete("FETCH 1"), ready()]);
    assert_eq!(h.received_tags(), "DCZ");
}

#[test]
fn an_execute_sent_behind_a_bind_the_server_refused_runs_the_servers_portal() {
    let mut h = harness(APP);
    // Both batches are sent before any answer: the second's Execute of "c" was first taken for
    // the failed Bind's portal.
    h.clients(vec![bind("c", "", &[]), sync()]);
    h.clients(vec![
        parse("", "BEGIN"),
        bind("", "", &[]),
        execute("", 0),
        parse("", "DECLARE c CURSOR FOR SELECT id, name FROM customers ORDER BY id"),
        bind("", "", &[]),
        execute("", 0),
        execute("c", 0),
        sync(),
    ]);
    assert_eq!(tags(&h.sent()), "BSPBDEPBDEDES");
    h.server(vec![
        server_error("26000", "unnamed prepared statement does not exist"),
        ready(),
        empty(b'1'),
        empty(b'2'),
        empty(b'n'),
        complete("BEGIN"),
        empty(b'1'),
        empty(b'2'),
        empty(b'n'),
        complete("DECLARE CURSOR"),
        row_desc(&[("id", 16_384, 1), ("name", 16_384, 2)]),
        data_row(&["1", "Canary One"]),
        complete("FETCH 1"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "EZ12C12CDCZ");
}

#[test]
fn a_cursor_closed_after_an_execute_sent_behind_a_failed_bind_still_serves_that_execute() {
    let mut h = harness(APP);
    h.clients(vec![bind("c", "", &[]), sync()]);
    h.clients(vec![
        parse("", "BEGIN"),
        bind("", "", &[]),
        execute("", 0),
        parse("", "DECLARE c CURSOR FOR SELECT id, name FROM customers ORDER BY id"),
        bind("", "", &[]),
        execute("", 0),
        execute("c", 0),
        // Decided before the Bind's error comes: pgveil already forgot the cursor.
        parse("", "CLOSE c"),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]);
    h.sent();
    h.server(vec![
        server_error("26000", "unnamed prepared statement does not exist"),
        ready(),
        empty(b'1'),
        empty(b'2'),
        empty(b'n'),
        complete("BEGIN"),
        empty(b'1'),
        empty(b'2'),
        empty(b'n'),
        complete("DECLARE CURSOR"),
        row_desc(&[("id", 16_384, 1), ("name", 16_384, 2)]),
        data_row(&["1", "Canary One"]),
        complete("FETCH 1"),
        empty(b'1'),
        empty(b'2'),
        empty(b'n'),
        complete("CLOSE CURSOR"),
        ready(),
    ]);
    assert_eq!(h.received_tags(), "EZ12C12CDC12CZ");
}
