#!/usr/bin/env python3
"""/health and /v1/models of a running kvserve, read with Python's standard library only.

Usage: check_endpoints.py HTTP_PORT API_KEY   (prints "ok", exits non-zero on a mismatch)
"""
import json
import sys
import urllib.error
import urllib.request


def get(url, key=None):
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def main():
    port, key = sys.argv[1], sys.argv[2]
    base = "http://127.0.0.1:" + port
    status, body = get(base + "/health")
    assert (status, body) == (200, {"status": "SERVING"}), (status, body)
    status, body = get(base + "/v1/models", key)
    assert status == 200, (status, body)
    assert body["object"] == "list" and len(body["data"]) == 1, body
    model = body["data"][0]
    assert model["id"] == "gpt2-tiny-docs" and model["max_model_len"] == 1024, model
    assert model["kvserve"]["kv_format"] == "kivi2" and model["kvserve"]["kv_page_tokens"] > 0
    status, body = get(base + "/v1/models")  # no key
    assert status == 401 and body["error"]["code"] == "invalid_api_key", (status, body)
    print("ok")


if __name__ == "__main__":
    main()
