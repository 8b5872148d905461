// pgjdbc through pgveil. One JSON line per case; exit 1 on failure.
// Usage: java -cp postgresql.jar:. Suite HOST PORT DBNAME ROLE
import java.math.BigDecimal;
import java.sql.*;
import java.util.*;

public class Suite {
    static List<String> results = new ArrayList<>();
    static boolean allOk = true;
    static String role;

    interface Body { String run() throws Exception; }

    static void check(boolean cond, Object what) { if (!cond) throw new AssertionError(String.valueOf(what)); }

    static String esc(String s) { return s == null ? "" : s.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", " "); }

    static void run(String name, String modes, Body b) {
        String detail; boolean ok;
        try { detail = b.run(); ok = true; } catch (Throwable e) { detail = e.getClass().getSimpleName() + ": " + e.getMessage(); ok = false; }
        allOk &= ok;
        results.add(String.format("{\"driver\":\"pgjdbc\",\"version\":\"%s\",\"role\":\"%s\",\"case\":\"%s\",\"modes\":\"%s\",\"ok\":%s,\"detail\":\"%s\"}",
            org.postgresql.util.DriverInfo.DRIVER_VERSION, role, name, modes, ok, esc(detail)));
    }

    public static void main(String[] a) throws Exception {
        String url = "jdbc:postgresql://" + a[0] + ":" + a[1] + "/" + a[2] + "?sslmode=disable";
        role = a[3];
        boolean masked = !role.equals("dba");
        String ssn = masked ? "***-**-0001" : "900-00-0001";
        Properties p = new Properties();
        p.setProperty("user", role);
        p.setProperty("password", role + "_pw");
        try (Connection c = DriverManager.getConnection(url, p)) {
            run("prepared statement past the server-prepare threshold", "extended, server-prepared", () -> {
                try (PreparedStatement ps = c.prepareStatement("SELECT ssn FROM customers WHERE id = ?")) {
                    for (int i = 0; i < 12; i++) {
                        ps.setInt(1, 1);
                        try (ResultSet rs = ps.executeQuery()) { rs.next(); check(rs.getString(1).equals(ssn), rs.getString(1)); }
                    }
                }
                return "";
            });
            run("ResultSet getString / getDate / getBigDecimal", "extended", () -> {
                try (PreparedStatement ps = c.prepareStatement("SELECT ssn, birth_date, balance FROM customers WHERE id = ?")) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check(rs.getString(1).equals(ssn), rs.getString(1));
                        check(rs.getDate(2).toString().equals(masked ? "1980-01-01" : "1980-07-15"), rs.getDate(2));
                        check(rs.getBigDecimal(3).compareTo(new BigDecimal(masked ? "1000.00" : "1234.56")) == 0, rs.getBigDecimal(3));
                    }
                }
                return "";
            });
            for (boolean rewrite : new boolean[] {false, true}) {
                run("batch insert, reWriteBatchedInserts=" + rewrite, "extended, batch", () -> {
                    Properties q = (Properties) p.clone();
                    q.setProperty("reWriteBatchedInserts", String.valueOf(rewrite));
                    try (Connection b = DriverManager.getConnection(url, q)) {
                        b.setAutoCommit(false);
                        try (PreparedStatement ps = b.prepareStatement("INSERT INTO orders (customer_id, amount, status) VALUES (?, ?, ?)")) {
                            for (int i = 0; i < 50; i++) { ps.setInt(1, 1); ps.setBigDecimal(2, new BigDecimal("1.25")); ps.setString(3, "jdbc"); ps.addBatch(); }
                            ps.executeBatch();
                        }
                        b.rollback();
                    }
                    return "";
                });
            }
            run("blocked statement is an ordinary SQL error", "extended", () -> {
                if (!masked) return "exempt: not blocked";
                try (Statement s = c.createStatement()) {
                    s.executeQuery("SELECT id FROM customers ORDER BY ssn");
                    throw new AssertionError("not blocked");
                } catch (SQLException e) {
                    check("42501".equals(e.getSQLState()), e.getSQLState());
                }
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 1")) { rs.next(); check(rs.getInt(1) == 1, "usable"); }
                return "";
            });
        }
        for (String r : results) System.out.println(r);
        System.exit(allOk ? 0 : 1);
    }
}
