"""An S3 bucket that someone else wrote: moto's S3 server (a Python implementation of the S3 API used to
test boto3 code), started on a loopback port, with a bucket made public the way STScI's open-data bucket
is (a bucket policy that lets anyone GetObject, and nothing else), and objects uploaded with boto3: whole
or in parts, with the checksum algorithm asked for. Its ETags and checksums are moto's and botocore's
making, not our reading of S3.

    python3 moto_bucket.py PORT BUCKET UPLOADS.json

UPLOADS.json: [{"key": "...", "file": "/path", "part_size": null | bytes, "checksum": null | "CRC32" |
"SHA256" | "SHA1"}]. Prints "ready" when everything is uploaded, then serves until killed.
"""

import json
import sys

import boto3
from boto3.s3.transfer import TransferConfig
from moto.server import ThreadedMotoServer


def main():
    port, bucket, uploads = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=bucket)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    with open(uploads) as f:
        for u in json.load(f):
            extra = {"ChecksumAlgorithm": u["checksum"]} if u.get("checksum") else {}
            part = u.get("part_size")
            config = TransferConfig(
                multipart_threshold=part if part else 1 << 40,
                multipart_chunksize=part if part else 8 << 20,
            )
            s3.upload_file(u["file"], bucket, u["key"], Config=config, ExtraArgs=extra)
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
