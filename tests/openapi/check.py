"""Validates ragd's GET /openapi.json with openapi-spec-validator.

Usage: check.py BASE_URL. Exits non-zero with the validator's message when the
document is not a valid OpenAPI document.
"""
import json
import sys
import urllib.request

from openapi_spec_validator import validate

doc = json.load(urllib.request.urlopen(sys.argv[1] + "/openapi.json"))
validate(doc)
print(json.dumps({"openapi": doc["openapi"], "paths": sorted(doc["paths"])}))
