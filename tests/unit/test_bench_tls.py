"""lab.bench_tls's report: its table from fixed numbers."""

from lab import bench_tls

GiB, MiB = 1 << 30, 1 << 20


def test_section_puts_tls_beside_plain_text():
    x = {"wall": 1.5, "cpu": 2.25, "server_cpu": 0.5, "link": 300 * MiB}
    small = dict(x, link=MiB // 2)
    r = {"size": 2 * GiB, "rate": "1gbit", "server": "3.24",
         "data": 1536 * MiB, "load": ["0.1 0.1 0.1", "0.2 0.2 0.2"],
         "links": [("1gbit", [("first pull", "plain", x),
                              ("first pull", "TLS", x)]),
                   (None, [("refresh (9 blocks changed)", "TLS", small)])]}
    text = bench_tls.section(r)
    assert text.startswith(bench_tls.HEADING)
    assert "1536 MiB of random data" in text
    assert "| link 1gbit | | wall |" in text
    assert "| first pull | TLS | 1.50 s | 2.25 s | 0.50 s | 300 MiB |" in text
    assert "| unshaped loopback |" in text
    assert "| refresh (9 blocks changed) | TLS | 1.50 s | 2.25 s | 0.50 s | " \
        "0.50 MiB |" in text
