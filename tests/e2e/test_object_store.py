"""FOLDER in an object store: scan and classify s3://bucket/prefix against a real S3 endpoint (moto's
server on 127.0.0.1, checking every request's signature against a read-only IAM user's key) give the rows
the same files give on local disk, with either engine; reruns reuse the cache and the file index; a
missing bucket is exit 6 with a clear message."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_INPUT
from dinobatch.io.walk import walk_table
from dinobatch.schema import Col, read_metadata
from dinobatch.stages.fingerprint import known_shas
from dinobatch.store.results import ResultsDir
from tests.helpers import REPO, jpeg_bytes, picture

BUCKET, PREFIX = "photos", "inbox"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CLOSE = ("confidence", "probs", "topk_probs", "margin", "entropy")  # the model's floats, and those made of them
READ_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
# objects under the prefix, relative to it, and what a local folder with the same files holds
FILES = {
    "a.jpg": jpeg_bytes(picture(1)),
    "sub/b.jpg": jpeg_bytes(picture(2)),
    "sub/deep/c.jpg": jpeg_bytes(picture(3)),
    "sub/copy of a.jpg": jpeg_bytes(picture(1)),  # a duplicate of a.jpg, with a space in its key
    "truncated.jpg": jpeg_bytes(picture(4))[:700],  # corrupt: an error row
    "empty.jpg": b"",  # zero bytes: an error row
}
HIDDEN = {".hidden.jpg": jpeg_bytes(picture(5)), "a/.cache/x.jpg": jpeg_bytes(picture(6))}
OUTSIDE = {"inbox2/y.jpg": jpeg_bytes(picture(7)), "elsewhere/z.jpg": jpeg_bytes(picture(8))}  # not under inbox/


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, the bucket filled, a read-only user's key in the client's environment
    and, from then on, every request refused unless signed with a valid key (as a real store does)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    empty = tmp_path_factory.mktemp("aws") / "none"
    env = {"AWS_ACCESS_KEY_ID": "moto-admin", "AWS_SECRET_ACCESS_KEY": "moto-admin", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(empty),
           "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        _fill(boto3.client("s3"))
        iam = boto3.client("iam")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(READ_ONLY))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        mp.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        mp.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks signatures from now on
        local = tmp_path_factory.mktemp("local") / PREFIX
        for rel, data in FILES.items():
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(data)
        # files changed within 2 s of being hashed are left out of the file index (racy stat): wait, so
        # that a rerun is vouched for by the index as it would be the night after an upload
        time.sleep(2.2)
        yield {"uri": f"s3://{BUCKET}/{PREFIX}", "local": local, "secret": key["SecretAccessKey"]}
    server.stop()


def _fill(client) -> None:
    """The bucket: FILES and HIDDEN under the prefix, OUTSIDE beside it."""
    client.create_bucket(Bucket=BUCKET)
    for key, data in {**{f"{PREFIX}/{k}": v for k, v in {**FILES, **HIDDEN}.items()}, **OUTSIDE}.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)


@pytest.fixture
def ray_job(s3, ray_cluster):
    """This process joined to the shared Ray cluster (started before the store existed, so its nodes know
    neither its endpoint nor a key) as a job whose workers are given the key, as `ray job submit
    --runtime-env-json` or each node's own environment would give it; the endpoint is not given: the engine
    forwards it. dinobatch's runs use this connection and leave it open."""
    import ray

    keys = {k: os.environ[k] for k in CREDENTIALS}
    ray.init(address=ray_cluster.address, runtime_env={"env_vars": keys}, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        yield ray_cluster.address
    finally:
        ray.shutdown()


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    return result.exit_code, result.output


def comparable(path: Path, *ignored: str) -> dict[str, dict]:
    """Rows by path, without what differs between a store and a disk (mtime: when each was written)."""
    return {r[Col.PATH]: {k: v for k, v in r.items() if k not in ("mtime", "run_id", *ignored)}
            for r in pq.read_table(path).to_pylist()}


def test_the_walk_lists_objects_with_the_local_rules(s3):
    table = walk_table(s3["uri"])
    assert table[Col.PATH].to_pylist() == walk_table(s3["local"])[Col.PATH].to_pylist() == [
        "a.jpg", "empty.jpg", "sub/b.jpg", "sub/copy of a.jpg", "sub/deep/c.jpg", "truncated.jpg"]
    assert [p.decode() for p in table[Col.ABSPATH].to_pylist()][:4] == [
        f"{s3['uri']}/a.jpg", f"{s3['uri']}/empty.jpg", f"{s3['uri']}/sub/b.jpg", f"{s3['uri']}/sub/copy%20of%20a.jpg"]


def test_scan_of_a_bucket_gives_the_rows_of_the_same_files_on_disk(s3, tmp_path):
    code, output = invoke("scan", s3["uri"], "-o", tmp_path / "remote.parquet", "--workers", "2")
    assert code == 0, output
    code, output = invoke("scan", s3["local"], "-o", tmp_path / "local.parquet", "--workers", "2")
    assert code == 0, output
    remote = comparable(tmp_path / "remote.parquet")
    assert remote == comparable(tmp_path / "local.parquet")
    assert remote["truncated.jpg"]["status"] == "error" and remote["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert remote["sub/copy of a.jpg"]["duplicate_of"] == "a.jpg"
    assert s3["secret"] not in output


def test_classify_of_a_bucket_gives_the_rows_of_the_same_files_and_a_rerun_reuses_everything(s3, tmp_path,
                                                                                             tiny_model):
    species = REPO / "manifests" / "species.csv"
    common = ("--model", tiny_model, "--species", species, "-j", "0", "--batch-size", "4")
    code, output = invoke("classify", s3["uri"], "--out", tmp_path / "remote", *common)
    assert code == 0, output
    code, output = invoke("classify", s3["local"], "--out", tmp_path / "local", *common)
    assert code == 0, output
    remote_out, local_out = ResultsDir(tmp_path / "remote"), ResultsDir(tmp_path / "local")
    first = _rows_file(remote_out)
    remote = comparable(first)
    assert remote == comparable(_rows_file(local_out))
    assert sorted(remote) == sorted(FILES)
    assert remote["truncated.jpg"]["status"] == "error" and remote["empty.jpg"]["status"] == "error"
    assert read_metadata(pq.read_schema(first)).get("folder") == s3["uri"]
    assert s3["secret"] not in output

    # the file index vouches for every object it hashed by its size and mtime: none is read again
    walked = walk_table(s3["uri"])
    known = known_shas(walked, remote_out.read_file_index()).to_pylist()
    assert [p for p, sha in zip(walked[Col.PATH].to_pylist(), known) if sha is None] == ["empty.jpg"]
    code, output = invoke("classify", s3["uri"], "--out", tmp_path / "remote", *common)
    assert code == 0, output
    summary = _summary(tmp_path / "remote")
    assert summary["inferred"] == 0 and summary["reused"] == 3  # a, b, c (a's copy is a)
    assert comparable(_rows_file(remote_out)) == remote


def test_ray_scan_of_a_bucket_gives_the_rows_of_the_same_files_on_disk(s3, ray_job, tmp_path):
    code, output = invoke("scan", s3["uri"], "-o", tmp_path / "ray.parquet", "--engine", "ray", "--address", ray_job)
    assert code == 0, output
    code, output = invoke("scan", s3["local"], "-o", tmp_path / "local.parquet")
    assert code == 0, output
    ray = comparable(tmp_path / "ray.parquet")
    assert ray == comparable(tmp_path / "local.parquet")
    assert ray["sub/b.jpg"]["status"] == "ok" and ray["truncated.jpg"]["status"] == "error"
    assert ray["sub/copy of a.jpg"]["duplicate_of"] == "a.jpg"
    assert s3["secret"] not in output


def test_ray_classify_of_a_bucket_gives_the_rows_of_the_same_files_on_disk(s3, ray_job, tmp_path, tiny_model):
    common = ("--model", tiny_model, "--species", REPO / "manifests" / "species.csv", "--batch-size", "4")
    code, output = invoke("classify", s3["uri"], "--out", tmp_path / "ray", "--engine", "ray", "--address",
                          ray_job, *common)
    assert code == 0, output
    code, output = invoke("classify", s3["local"], "--out", tmp_path / "local", "-j", "0", *common)
    assert code == 0, output
    first = _rows_file(ResultsDir(tmp_path / "ray"))
    ray, local = comparable(first), comparable(_rows_file(ResultsDir(tmp_path / "local")))
    _assert_same_rows(ray, local)
    assert sorted(ray) == sorted(FILES) and ray["a.jpg"]["status"] == "ok"
    assert ray["truncated.jpg"]["status"] == "error" and ray["empty.jpg"]["status"] == "error"
    assert read_metadata(pq.read_schema(first)).get("folder") == s3["uri"]
    assert s3["secret"] not in output


def test_a_missing_bucket_or_prefix_is_exit_6_with_a_clear_message(s3, tmp_path):
    for uri in (f"s3://no-such-bucket-here/{PREFIX}", f"s3://{BUCKET}/no-such-prefix"):
        for command in (["scan", uri, "-o", tmp_path / "x.parquet"], ["classify", uri, "--out", tmp_path / "out"]):
            code, output = invoke(*command)
            assert code == EXIT_INPUT, output
            assert f"input folder not found: {uri}" in output and s3["secret"] not in output


def _assert_same_rows(ray: dict[str, dict], local: dict[str, dict]) -> None:
    """Equal rows, but the floats the model computes (within 1e-5: another process, maybe another batch)."""
    assert sorted(ray) == sorted(local)
    for path, row in local.items():
        assert {k for k in ray[path] if k not in CLOSE} == {k for k in row if k not in CLOSE}
        for column, value in row.items():
            other = ray[path][column]
            if column in CLOSE and value is not None and other is not None:
                pairs = zip(value, other) if isinstance(value, list) else [(value, other)]
                assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in pairs), (path, column)
            else:
                assert other == value, (path, column)


def _rows_file(out: ResultsDir) -> Path:
    return Path(_summary(out.path)["rows_file"])


def _summary(out: Path) -> dict:
    import json

    return json.loads((out / "_summary.json").read_text())
