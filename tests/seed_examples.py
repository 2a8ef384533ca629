"""The Collector API document's examples, as the bytes each client puts on the wire.

Shared by the unit and end-to-end tests: the document's examples must work verbatim.
"""

# curl -d '...' from ../shared/seeds/000_389a03107656973e.txt, byte for byte.
CURL_BODY = b"""{
    "type": "track",
    "event": "Button Clicked",
    "anonymousId": "550e8400-e29b-41d4-a716-446655440000",
    "properties": {
      "button_id": "signup_hero",
      "color": "blue"
    }
  }"""
