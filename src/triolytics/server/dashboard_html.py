"""The dashboard's two HTML pages: the login form and the page shell the script fills.

Rules:
- Pure functions of their arguments, returning UTF-8 bytes; no I/O, no state. The
  server (`dashboard.py`) sends them with its strict CSP.
- Every value from outside (an error message, a project name, the role, an asset URL) goes
  through `html.escape`, attributes included; nothing is pasted in raw.
- No inline script, no `style` attribute, no event-handler attribute: the CSP
  (`script-src 'self'; style-src 'self'`) would block them. The script and styles are files
  of `static/dashboard/`, referenced by the URLs in `assets` (file name -> URL, e.g. with a
  `?v=<hash>`); a file missing there is referenced at its plain `/dashboard/static/` URL.
- The page holds no figures: `dashboard.js` asks `/dashboard/figures` for them and
  `/dashboard/live` (Server-Sent Events) for the live panel. The shell names each place
  it fills with an `id` or a `data-*` attribute; the script relies on those names.
- Forms post to the same origin (`form-action 'self'`): `/login`, `/logout`.
"""

from __future__ import annotations

from html import escape

STATIC = "/dashboard/static/"
SCRIPTS = ("uPlot.iife.min.js", "dashboard.js")  # in this order: the chart, then the page
STYLES = ("uPlot.min.css", "dashboard.css")
RANGES = (("today", "Today"), ("24h", "24 h"), ("7d", "7 days"), ("30d", "30 days"),
          ("custom", "Custom"))
# The overview cards: (figure in `overview`, label, series it charts or "" for none).
CARDS = (("visitors", "Visitors", "visitors"), ("sessions", "Sessions", "sessions"),
         ("events", "Events", "events"), ("pageviews", "Pageviews", "views"),
         ("screen_views", "Screen views", "views"), ("bounce_rate", "Bounce rate", ""),
         ("duration_median_ms", "Median session", ""), ("duration_mean_ms", "Mean session", ""))
# The bar lists: (key in `top`, title, what its counts are).
LISTS = (("pages", "Top pages & screens", "Views"), ("referrers", "Referrers", "Pageviews"),
         ("events", "Top events", "Events"), ("browsers", "Browsers", "Visitors"),
         ("os", "Operating systems", "Visitors"))


def _url(assets: dict[str, str] | None, name: str) -> str:
    return escape((assets or {}).get(name) or STATIC + name)


def _head(title: str, assets: dict[str, str] | None, scripts: bool) -> str:
    links = "".join(f'<link rel="stylesheet" href="{_url(assets, n)}">' for n in STYLES)
    tags = "".join(f'<script src="{_url(assets, n)}" defer></script>' for n in SCRIPTS) \
        if scripts else ""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer">'
            f"<title>{escape(title)}</title>{links}{tags}</head>")


def render_login(error: str | None = None, assets: dict[str, str] | None = None) -> bytes:
    """The login form: one password field for the admin or the viewer token."""
    alert = f'<p class="login-error" role="alert">{escape(error)}</p>' if error else ""
    return (_head("Log in · triolytics", assets, scripts=False) +
            '<body class="login-body"><main class="login">'
            '<h1 class="brand">triolytics</h1>'
            '<form method="post" action="/login" class="login-form">'
            '<label for="token">Token</label>'
            '<input id="token" name="token" type="password" required autofocus '
            'autocomplete="current-password" spellcheck="false">'
            f"{alert}"
            '<button type="submit">Log in</button></form>'
            '<p class="login-help">The admin token (<code>&lt;data_dir&gt;/admin.token</code>) '
            "or the read-only viewer token (<code>&lt;data_dir&gt;/viewer.token</code>).</p>"
            "</main></body></html>").encode()


def _header(role: str, projects: list[str]) -> str:
    ranges = "".join(f'<button type="button" data-range="{n}">{escape(label)}</button>'
                     for n, label in RANGES)
    options = "".join(f'<option value="{escape(p)}">{escape(p)}</option>' for p in projects)
    return ('<header class="top"><div class="top-in">'
            '<a class="brand" href="/">triolytics</a>'
            '<label class="project"><span class="sr">Project</span>'
            f'<select id="project"><option value="">All projects</option>{options}</select>'
            "</label>"
            f'<div class="ranges" role="group" aria-label="Range">{ranges}</div>'
            '<form id="custom" class="custom" hidden>'
            '<label><span class="sr">From</span><input type="date" name="since" required>'
            "</label><span>–</span>"
            '<label><span class="sr">To</span><input type="date" name="until" required>'
            '</label><button type="submit">Apply</button></form>'
            f'<span class="role" title="Logged in as">{escape(role)}</span>'
            '<form method="post" action="/logout" class="logout">'
            '<button type="submit">Log out</button></form>'
            "</div></header>")


def _card(figure: str, label: str, series: str) -> str:
    # A card that has a series is a button-like tab: choosing it charts that series.
    pick = f' data-series="{series}" tabindex="0" role="button"' if series else ""
    return (f'<div class="card" data-figure="{figure}"{pick}><h3>{escape(label)}</h3>'
            '<p class="value">–</p><p class="change"></p></div>')


def _cards() -> str:
    cards = "".join(_card(*c) for c in CARDS)
    return f'<section class="cards" id="overview" aria-label="Overview">{cards}</section>'


def _lists() -> str:
    return "".join(
        f'<section class="panel list"><div class="panel-head"><h2>{escape(title)}</h2>'
        f'<span class="unit">{escape(unit)}</span></div>'
        f'<ol class="bars" id="top-{key}"></ol></section>' for key, title, unit in LISTS)


def render_page(role: str, projects: list[str], assets: dict[str, str]) -> bytes:
    """The dashboard's shell: header, overview cards, chart, top lists, live panel,
    session explorer. `role` is "admin" or "viewer"; `projects` fill the filter."""
    return (_head("triolytics", assets, scripts=True) +
            f'<body data-role="{escape(role)}">{_header(role, projects)}'
            '<div class="layout"><main class="main">'
            '<p id="error" class="error" role="alert" hidden></p>'
            f"{_cards()}"
            '<section class="panel chart-panel"><div class="panel-head">'
            '<h2 id="chart-title">Visitors</h2><span class="unit" id="chart-unit"></span>'
            '</div><div id="chart" class="chart"></div></section>'
            f'<div class="lists">{_lists()}</div>'
            '<p class="generated" id="generated"></p></main>'
            '<aside class="panel live" aria-label="Live">'
            '<div class="panel-head"><h2><span class="dot" id="live-dot"></span>Live</h2>'
            '<span class="unit" id="live-state">connecting…</span></div>'
            '<div class="live-figures">'
            '<div><p class="value" id="open-sessions">–</p><p>sessions open now</p></div>'
            '<div><p class="value" id="events-per-s">–</p><p>events per second</p></div>'
            "</div>"
            '<h3 class="latest-title">Latest events</h3>'
            '<ol class="latest" id="latest"><li class="empty">Waiting for events…</li></ol>'
            "</aside></div>"
            '<dialog id="session" class="session" aria-labelledby="session-title">'
            '<div class="panel-head"><h2 id="session-title">Session</h2>'
            '<form method="dialog"><button type="submit" class="close" '
            'aria-label="Close">×</button></form></div>'
            '<p class="session-meta" id="session-meta"></p>'
            '<ol class="timeline" id="session-events"></ol></dialog>'
            "</body></html>").encode()
