"""Credentials inside an endpoint URL never reach an error line (config.yaml masked them; errors printed them)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from job import storage
from job.errors import ConfigError, StorageError

SECRET = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs"), blacklist_characters="/\"'"), min_size=1,
                 max_size=12)


@given(user=SECRET, password=SECRET)
def test_an_unreachable_endpoints_credentials_are_masked(user, password):
    from botocore.exceptions import EndpointConnectionError

    url = f"http://{user}:{password}@127.0.0.1:1/bucket?list-type=2"
    with pytest.raises(StorageError) as e, storage.storage_errors("s3://bucket/data: listing"):
        raise EndpointConnectionError(endpoint_url=url)
    assert str(e.value) == ('s3://bucket/data: listing: storage unreachable (Could not connect to the endpoint URL: '
                            '"http://***@127.0.0.1:1/bucket?list-type=2")')


def test_an_endpoint_without_a_scheme_is_refused_masked():
    with pytest.raises(ConfigError, match=r"^config: S3 endpoint '\*\*\*@minio:9000' \(s3.endpoint_url") as e:
        storage.client("AKIA:s3cr@t@minio:9000")
    assert "s3cr" not in str(e.value)
