"""The stylesheet of kiln's HTML pages (report.html, sweep.html), so that they look alike."""

__all__ = ["STYLESHEET"]

#: CSS for a page whose content sits in ``<main>``: sections, tables, cards, findings, commands, figures.
STYLESHEET = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1060px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#5b6473;margin-bottom:16px} code,pre{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:13px}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #d8dce3;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef0f4} .cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:10px 12px}
.card .k{color:#5b6473;font-size:12px;text-transform:uppercase;letter-spacing:.04em} .card .v{font-size:22px;font-weight:600}
.status-completed{color:#1a7f37} .status-diverged,.status-failed,.status-killed{color:#c62828} .status-interrupted,.status-running{color:#b26a00}
.finding{background:#fff8e6;border:1px solid #f0c36d;border-left:5px solid #e09b00;border-radius:6px;padding:10px 14px;margin:10px 0}
.finding h3{margin:0 0 6px;font-size:16px} .finding ul{margin:4px 0 6px 18px;padding:0}
.ok{background:#eaf7ee;border:1px solid #9fd5ad;border-radius:6px;padding:10px 14px}
.cmd{background:#1d2330;color:#e8ecf2;padding:6px 10px;border-radius:4px;display:block;overflow-x:auto}
figure{background:#fff;border:1px solid #d8dce3;border-radius:6px;margin:0 0 14px;padding:8px;text-align:center}
figure img{max-width:100%;height:auto} figcaption{color:#5b6473;font-size:13px}
pre{background:#fff;border:1px solid #d8dce3;padding:10px;overflow-x:auto}
"""
