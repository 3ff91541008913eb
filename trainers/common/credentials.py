"""Credentials inside URIs, by one rule: `redact` wherever a URI (or a text that may hold one) is
printed, stored in a record, tagged in MLflow or handed to anything that pickles.

A URI carries a secret as its user-info password (`postgresql://optuna:SECRET@host/db`,
`http://user:SECRET@mlflow:5000`, pyarrow's `s3://KEY:SECRET@bucket/...`) or as a query parameter
(`?password=...`, a presigned URL's `X-Amz-Signature=...`). `redact` keeps the rest, so a message still
says which server or database it means. Where a location becomes part of other paths (the sweep's
folder, the FID cache), credentials in it are refused instead (`has_credentials`): they would be
copied into every checkpoint's recorded location.

Pure `re`: the bottom layer's errors use it, and importing it costs nothing.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://user:password@host: the password runs to the authority's last `@` (an unencoded `@` or `/` in a
# password, which clients accept, is still inside it); the user may be empty (`redis://:password@host`)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*:)(?P<secret>\S*?)@(?![^\s/]*@)")
_QUERY = re.compile(r"(?i)(?P<head>[?&](?:password|passwd|pwd|secret|secret_key|secret_access_key|access_token|token|"
                    r"sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|sas|key)=)(?P<secret>[^&#\s'\"]+)")


def redact(text: str) -> str:
    """`text` with every URI's password and secret query values replaced by `***`."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def redacted(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with every string passed through `redact`."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(item) for item in value]
    return value


def has_credentials(text: str) -> bool:
    return redact(text) != text


def credentials_message(location: str) -> str:
    """Why a location with credentials in it is refused (a field's one-line error)."""
    return (f"{redact(location)} carries credentials; they would be recorded wherever the location is (checkpoints, "
            "records, Ray's state): give them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the provider's own)")
