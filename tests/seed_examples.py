"""The API documents' examples, as the bytes each client puts on the wire.

Shared by the unit and end-to-end tests: the document's examples must work verbatim.
"""

# curl -d '...' of the Collector API document (docs/collector-api.md), byte for byte.
CURL_BODY = b"""{
    "type": "track",
    "event": "Button Clicked",
    "anonymousId": "550e8400-e29b-41d4-a716-446655440000",
    "properties": {
      "button_id": "signup_hero",
      "color": "blue"
    }
  }"""

# "Payload Format" of the Real-Time Analytics API document (docs/realtime-api.md),
# byte for byte.
DOC_PAYLOAD = """{
  "events": [
    {
      "type": "screen_view",
      "ts": 1706859000000,
      "payload": { "screen_name": "Home" }
    },
    {
      "type": "button_click",
      "ts": 1706859005000,
      "payload": { "btn_id": "play_music" }
    }
  ]
}"""


def load_bench_script(name: str):
    """A script of bench/ as a module (once per test session: tests share it)."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
