"""Prompt sources: every local format and its errors, and S3 objects/prefixes on a real (moto) S3 server."""
import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tdm import sources
from tdm.errors import ConfigError
from tdm.sources import download_s3_prefix, load_prompts, prompts_fingerprint, split_s3_uri

FIELD = "data.prompt_source"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def raises_config(match, field=FIELD):
    """pytest.raises for a ConfigError whose message starts with `field` and contains `match` (a regex)."""
    return pytest.raises(ConfigError, match=rf"^{field}: .*{match}")


# --- split_s3_uri ----------------------------------------------------------------------------------------------

def test_split_s3_uri():
    assert split_s3_uri("s3://bucket/some/prefix") == ("bucket", "some/prefix")
    assert split_s3_uri("s3://bucket/some/prefix/") == ("bucket", "some/prefix/")
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    assert split_s3_uri("s3://bucket/") == ("bucket", "")


@pytest.mark.parametrize("uri", ["bucket/key", "http://bucket/key", "s3://", "s3:///key", "s3://my bucket/key"])
def test_split_s3_uri_malformed(uri):
    with raises_config("not an s3://bucket/prefix uri", field="teacher.uri"):
        split_s3_uri(uri, field="teacher.uri")


# --- local files -----------------------------------------------------------------------------------------------

def test_txt_strips_skips_blank_keeps_order_and_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a red cube \n\n b\n   \na red cube\r\nc")
    assert load_prompts(str(path)) == ["a red cube", "b", "a red cube", "c"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".JSONL"])
def test_jsonl(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"p{suffix}", [{"prompt": " x ", "id": 1}, {"prompt": ""}, {"prompt": "y"}])
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are fine
    assert load_prompts(str(path)) == ["x", "y"]


def test_jsonl_custom_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"caption": "one"}, {"caption": "two"}])
    assert load_prompts(str(path), column="caption") == ["one", "two"]


def test_jsonl_missing_column_names_column_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no prompt here"}])
    with raises_config(r"p\.jsonl line 2: no 'prompt' key"):
        load_prompts(str(path))


def test_jsonl_line_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [["a", "list"]])
    with raises_config(r"line 1: no 'prompt' key"):
        load_prompts(str(path))


def test_jsonl_value_not_a_string(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "ok"}, {"prompt": 3}])
    with raises_config(r"line 3: 'prompt' is a int, not a string"):
        load_prompts(str(path))


def test_jsonl_bad_json(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with raises_config(r"p\.jsonl line 2: invalid JSON"):
        load_prompts(str(path))


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", prompt=[" a ", None, "", "b", "a"], seed=[1, 2, 3, 4, 5])
    assert load_prompts(str(path)) == ["a", "b", "a"]
    path = write_parquet(tmp_path / "q.parquet", caption=["c1", "c2"])
    assert load_prompts(str(path), column="caption") == ["c1", "c2"]


def test_parquet_missing_column_lists_columns(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", caption=["x"], seed=[1])
    with raises_config(r"p\.parquet has no column 'prompt'; columns: caption, seed"):
        load_prompts(str(path))


def test_parquet_column_not_strings(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", prompt=[1, 2])
    with raises_config(r"row 0: 'prompt' is a int, not a string"):
        load_prompts(str(path))


def test_parquet_corrupt(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"this is not parquet")
    with raises_config(r"cannot read .*p\.parquet as parquet"):
        load_prompts(str(path))


def test_unreadable_text(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"ok\n\xff\xfe bad utf-8\n")
    with raises_config(r"cannot read .*p\.txt"):
        load_prompts(str(path))


def test_missing_path(tmp_path):
    with raises_config(r"nope\.txt does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nx\n")
    with raises_config(r"unsupported file type '\.csv'"):
        load_prompts(str(path))


@pytest.mark.parametrize("name,content", [("p.txt", "\n  \n"), ("p.jsonl", '{"prompt": "  "}\n')])
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with raises_config("contains no prompts"):
        load_prompts(str(tmp_path / name))


def test_field_is_the_callers(tmp_path):
    with raises_config("does not exist", field="eval.prompts"):
        load_prompts(str(tmp_path / "nope.txt"), field="eval.prompts")


def test_limit(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\n")
    assert load_prompts(str(path), limit=2) == ["a", "b"]
    assert load_prompts(str(path), limit=10) == ["a", "b", "c"]


# --- local directories -----------------------------------------------------------------------------------------

def test_directory_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "nested").mkdir()
    (tmp_path / "a.txt").write_text("t1\nt2\n")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"prompt": "j1"}])
    write_parquet(tmp_path / "b" / "nested" / "d.parquet", prompt=["p1", "p2"])
    (tmp_path / "b" / "meta.json").write_text('{"not": "prompts"}')  # .json is skipped inside directories
    (tmp_path / "README.md").write_text("ignored")
    assert load_prompts(str(tmp_path)) == ["t1", "t2", "j1", "p1", "p2"]


def test_directory_without_prompt_files(tmp_path):
    (tmp_path / "README.md").write_text("nothing")
    with raises_config(r"has no \.txt, \.jsonl, \.parquet files"):
        load_prompts(str(tmp_path))


def test_directory_with_only_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n")
    with raises_config("contains no prompts"):
        load_prompts(str(tmp_path))


def test_directory_error_names_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("fine\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with raises_config(r"b\.jsonl line 1: no 'prompt' key"):
        load_prompts(str(tmp_path))


# --- fingerprint -----------------------------------------------------------------------------------------------

def test_prompts_fingerprint():
    fp = prompts_fingerprint(["a", "b"])
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == prompts_fingerprint(["a", "b"])
    assert fp != prompts_fingerprint(["b", "a"])
    assert fp != prompts_fingerprint(["a", "b", "b"])


# --- S3 --------------------------------------------------------------------------------------------------------

BUCKET = "tdm-test"


@pytest.fixture
def s3(s3_server):
    """A client for the test server and a fresh prefix, so tests sharing the session's bucket never collide."""
    import boto3

    return boto3.client("s3"), f"t-{uuid.uuid4().hex[:8]}"


def put(client, key, body):
    client.put_object(Bucket=BUCKET, Key=key, Body=body.encode() if isinstance(body, str) else body)


def parquet_bytes(tmp_path, **columns):
    return write_parquet(tmp_path / f"{uuid.uuid4().hex}.parquet", **columns).read_bytes()


def test_download_prefix_keeps_relative_paths(s3, tmp_path):
    client, pre = s3
    put(client, f"{pre}/data/a.txt", "a")
    put(client, f"{pre}/data/sub/deep/b.txt", "b")
    put(client, f"{pre}/data/sub/", "")              # a console-made "folder" placeholder: skipped
    put(client, f"{pre}/data2/other.txt", "other")   # a sibling prefix sharing the name's start: not included
    dest = download_s3_prefix(f"s3://{BUCKET}/{pre}/data", tmp_path / "out", field="teacher.uri")
    assert dest == tmp_path / "out"
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [".tdm-complete", "a.txt", "sub/deep/b.txt"]
    assert (dest / "sub" / "deep" / "b.txt").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind


def test_download_prefix_is_cached(s3, tmp_path):
    client, pre = s3
    put(client, f"{pre}/a.txt", "first")
    dest = download_s3_prefix(f"s3://{BUCKET}/{pre}/", tmp_path / "out", field="f")
    client.delete_object(Bucket=BUCKET, Key=f"{pre}/a.txt")  # a re-download would now fail with "no objects"
    assert download_s3_prefix(f"s3://{BUCKET}/{pre}/", tmp_path / "out", field="f") == dest
    assert (dest / "a.txt").read_text() == "first"


def test_download_prefix_paginates(s3, tmp_path, monkeypatch):
    """More objects than one listing page (1000 on S3; 2 here, to keep the test fast) all arrive."""
    client, pre = s3
    for i in range(5):
        put(client, f"{pre}/{i}.txt", str(i))
    real_client = sources.s3_client
    pages = []

    def small_pages_client():
        c = real_client()
        get_paginator = c.get_paginator

        def paginator(name):
            p = get_paginator(name)
            paginate = p.paginate

            def small(**kw):
                for page in paginate(**kw, PaginationConfig={"PageSize": 2}):
                    pages.append(page)
                    yield page
            p.paginate = small
            return p
        c.get_paginator = paginator
        return c

    monkeypatch.setattr(sources, "s3_client", small_pages_client)
    dest = download_s3_prefix(f"s3://{BUCKET}/{pre}", tmp_path / "out", field="f")
    assert sorted(p.name for p in dest.glob("*.txt")) == [f"{i}.txt" for i in range(5)]
    assert len(pages) == 3


def test_download_empty_prefix(s3, tmp_path):
    _, pre = s3
    with raises_config(rf"no objects under s3://{BUCKET}/{pre}/nothing", field="teacher.uri"):
        download_s3_prefix(f"s3://{BUCKET}/{pre}/nothing", tmp_path / "out", field="teacher.uri")
    assert list(tmp_path.iterdir()) == []


def test_download_missing_bucket(s3, tmp_path):
    with raises_config(r"cannot list s3://no-such-bucket-tdm/x: .*NoSuchBucket", field="f"):
        download_s3_prefix("s3://no-such-bucket-tdm/x", tmp_path / "out", field="f")


def test_download_into_foreign_directory_refused(s3, tmp_path):
    client, pre = s3
    put(client, f"{pre}/a.txt", "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user data")
    with raises_config("exists and is not a completed download", field="f"):
        download_s3_prefix(f"s3://{BUCKET}/{pre}", tmp_path / "out", field="f")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_download_into_empty_existing_directory(s3, tmp_path):
    client, pre = s3
    put(client, f"{pre}/a.txt", "a")
    (tmp_path / "out").mkdir()
    dest = download_s3_prefix(f"s3://{BUCKET}/{pre}", tmp_path / "out", field="f")
    assert (dest / "a.txt").read_text() == "a"


def test_failed_download_leaves_nothing(s3, tmp_path, monkeypatch):
    """A download that fails halfway leaves neither dest nor a temporary directory."""
    from botocore.exceptions import EndpointConnectionError

    client, pre = s3
    for name in ("a.txt", "b.txt", "c.txt"):
        put(client, f"{pre}/{name}", name)
    real_client = sources.s3_client

    def flaky_client():
        c = real_client()
        download_file, calls = c.download_file, []

        def flaky(bucket, key, filename, **kw):
            calls.append(key)
            if len(calls) == 2:
                raise EndpointConnectionError(endpoint_url="http://gone")
            return download_file(bucket, key, filename, **kw)
        c.download_file = flaky
        return c

    monkeypatch.setattr(sources, "s3_client", flaky_client)
    with raises_config(rf"cannot download s3://{BUCKET}/{pre}/b\.txt: Could not connect", field="f"):
        download_s3_prefix(f"s3://{BUCKET}/{pre}", tmp_path / "out", field="f")
    assert list(tmp_path.iterdir()) == []


def test_load_prompts_from_prefix(s3, tmp_path):
    client, pre = s3
    put(client, f"{pre}/prompts/a.txt", "t1\n\nt2\n")
    put(client, f"{pre}/prompts/b/c.jsonl", '{"prompt": "j1"}\n')
    put(client, f"{pre}/prompts/b/d.parquet", parquet_bytes(tmp_path, prompt=["p1"]))
    expected = ["t1", "t2", "j1", "p1"]
    assert load_prompts(f"s3://{BUCKET}/{pre}/prompts") == expected
    assert load_prompts(f"s3://{BUCKET}/{pre}/prompts/", limit=3) == expected[:3]


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl", "p.parquet"])
def test_load_prompts_from_single_object(s3, tmp_path, name):
    client, pre = s3
    body = {"p.txt": "x\ny\n", "p.jsonl": '{"prompt": "x"}\n{"prompt": "y"}\n',
            "p.parquet": parquet_bytes(tmp_path, prompt=["x", "y"])}[name]
    put(client, f"{pre}/{name}", body)
    put(client, f"{pre}/{name}.bak", "must not be read")
    assert load_prompts(f"s3://{BUCKET}/{pre}/{name}") == ["x", "y"]


def test_s3_errors_name_the_s3_object(s3):
    client, pre = s3
    put(client, f"{pre}/p.jsonl", '{"caption": "x"}\n')
    with raises_config(rf"s3://{BUCKET}/{pre}/p\.jsonl line 1: no 'prompt' key"):
        load_prompts(f"s3://{BUCKET}/{pre}/p.jsonl")
    put(client, f"{pre}/dir/q.jsonl", '{"caption": "x"}\n')
    with raises_config(rf"s3://{BUCKET}/{pre}/dir/q\.jsonl line 1: no 'prompt' key"):
        load_prompts(f"s3://{BUCKET}/{pre}/dir")
    put(client, f"{pre}/p.csv", "prompt\nx\n")
    with raises_config(r"unsupported file type '\.csv'"):
        load_prompts(f"s3://{BUCKET}/{pre}/p.csv")


def test_load_prompts_missing_s3_source(s3):
    _, pre = s3
    with raises_config(rf"no objects under s3://{BUCKET}/{pre}/missing\.txt"):
        load_prompts(f"s3://{BUCKET}/{pre}/missing.txt")


def test_load_prompts_empty_s3_object(s3):
    client, pre = s3
    put(client, f"{pre}/empty.txt", "\n\n")
    with raises_config("contains no prompts"):
        load_prompts(f"s3://{BUCKET}/{pre}/empty.txt")


def test_load_prompts_malformed_s3_uri():
    with raises_config("not an s3://bucket/prefix uri"):
        load_prompts("s3:///nobucket")


def test_unreachable_endpoint_is_a_config_error(s3_server, tmp_path, monkeypatch):
    """Nothing listens on port 9: the error must come quickly (short timeouts, 2 attempts) and as a ConfigError."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with raises_config("cannot list s3://tdm-test/x: Could not connect", field="teacher.uri"):
        download_s3_prefix("s3://tdm-test/x", tmp_path / "out", field="teacher.uri")
    with raises_config("cannot read s3://tdm-test/p.txt: Could not connect"):
        load_prompts("s3://tdm-test/p.txt")
    assert list(tmp_path.iterdir()) == []


def test_malformed_endpoint_is_a_config_error(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not a url")
    with raises_config("Invalid endpoint", field="f"):
        download_s3_prefix("s3://tdm-test/x", tmp_path / "out", field="f")
