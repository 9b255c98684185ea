-- The whole-object checksum the cloud bucket gave with the bytes of a job's .part file
-- ("x-amz-checksum-crc64nvme:<base64>"), kept with their validator: S3 gives it only on a whole answer,
-- and a resumed transfer is checked against it from the first byte.
ALTER TABLE downloads ADD COLUMN checksum TEXT;
