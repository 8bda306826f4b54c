"""Credentials inside a URL never reach an error line, a log record or config.yaml (config.yaml masked them; errors
printed them, and a password with an unencoded `/ # ? '` or `"` escaped the masking or broke the URL)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from job import config, metrics, storage
from job.errors import ConfigError, StorageError
from job.uris import masked

# user names and passwords as users write them: anything but white space, unencoded
SECRET = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="@"),
                 min_size=3, max_size=12).filter(lambda s: s.strip() == s and "://" not in s)


@given(user=SECRET, password=SECRET)
@example(user="EPUSERzz", password="EP/PASSzz").via("a probe's")
@example(user="EPUSERzz", password='EP"PASSzz').via("a probe's")
def test_an_unreachable_endpoints_credentials_are_masked(user, password):
    from botocore.exceptions import EndpointConnectionError

    url = f"http://{user}:{password}@127.0.0.1:1/bucket?list-type=2"
    with pytest.raises(StorageError) as e, storage.storage_errors("s3://bucket/data: listing"):
        raise EndpointConnectionError(endpoint_url=url)
    assert str(e.value) == ('s3://bucket/data: listing: storage unreachable (Could not connect to the endpoint URL: '
                            '"http://***@127.0.0.1:1/bucket?list-type=2")')


@given(user=SECRET.filter(lambda u: not set(u) & set(":/\"'(`")), password=SECRET,
       before=st.sampled_from(["", " ", "(", "'", '"', "`", "got "]))
def test_masked_hides_user_and_password_with_or_without_a_scheme(user, password, before):
    url = f"{before}http://{user}:{password}@host:9091/x and more"
    assert masked(url) == f"{before}http://***@host:9091/x and more"
    assert masked(f"{before}{user}:{password}@host:9091 and more") == f"{before}***@host:9091 and more"


def test_masked_leaves_text_without_credentials_alone():
    for text in ("s3://bucket/key at 3", "http://h:9000/a path", "mail a@b.c", "no url"):
        assert masked(text) == text


def test_an_endpoint_without_a_scheme_is_refused_masked():
    with pytest.raises(ConfigError, match=r"^config: S3 endpoint '\*\*\*@minio:9000' \(s3.endpoint_url") as e:
        storage.client("AKIA:s3cr@t@minio:9000")
    assert "s3cr" not in str(e.value)


@pytest.mark.parametrize(("key", "value", "complaint"), [
    # config errors quoted the value, password and all
    ("metrics.pushgateway", "PGUSERzz:PGPASSzz@127.0.0.1:19091", "a user:password@ needs the scheme"),
    ("metrics.pushgateway", "ftp://PGUSERzz:PGPASSzz@pg:1", "expected http://host:port or host:port, not ftp://"),
    ("s3.endpoint_url", "EPUSERzz:EPPASSzz@127.0.0.1:19555", "expected a URL such as http://***@127.0.0.1:19555"),
    ("s3.endpoint_url", "ftp://EPUSERzz:EPPASSzz@h:1", "expected http:// or https://, not ftp://"),
    # a `#` `?` `/` unencoded cut the URL short: every push failed, and the password was logged and kept unmasked
    ("metrics.pushgateway", "http://PGUSERzz:PG#PASSzz@127.0.0.1:19091", "percent-encode # ? / @ :"),
    ("metrics.pushgateway", "http://PGUSERzz:PG/PASSzz@127.0.0.1:19091", "percent-encode # ? / @ :"),
    ("s3.endpoint_url", "http://EPUSERzz:EP?PASSzz@127.0.0.1:19555", "percent-encode # ? / @ :"),
    # s3:// with credentials, a `/` in the password: the "bucket" before it was quoted (the key id, half the secret)
    ("output.uri", "s3://USERzz:PASSzz/x@bucket/runs", "s3:// takes no user:password@"),
    ("data.uri", "s3://USERzz:PASSzz@bucket/data", "s3:// takes no user:password@"),
    # a port that is no number: exit 1 with a traceback, after the lease was taken
    ("metrics.pushgateway", "http://PGUSERzz:PGPASSzz@127.0.0.1:notaport", "the port must be a number"),
    ("metrics.pushgateway", "http://PGUSERzz:PGPASSzz@127.0.0.1:99999", "the port must be a number"),
])
def test_urls_with_credentials_are_refused_without_printing_them(key, value, complaint):
    with pytest.raises(ConfigError) as e:
        config.load(None, ["data.uri=/d", "output.uri=/o", f"{key}={value}"], environ={})
    assert str(e.value).startswith(f"config: {key}: ") and complaint in str(e.value), str(e.value)
    assert "PASSzz" not in str(e.value) and "USERzz" not in str(e.value)


def test_config_yaml_and_the_push_log_mask_credentials_keeping_the_host_as_written():
    kept = config.load(None, ["data.uri=/d", "output.uri=/o", "metrics.pushgateway=http://u:p%2Fw@[::1]:9091",
                              "s3.endpoint_url=https://AKIA:s3cr3t@minio:9000"], environ={})
    shown = config.redacted(kept)
    assert shown["metrics"]["pushgateway"] == "http://***@[::1]:9091"  # the brackets were dropped: no URL
    assert shown["s3"]["endpoint_url"] == "https://***@minio:9000"
    assert metrics._gateway("http://u:p%2Fw@[::1]:9091")[:2] == ("http://[::1]:9091", "http://***@[::1]:9091")
