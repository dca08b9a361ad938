"""Scalar logging without TensorFlow: `log.jsonl` and TensorBoard event files.

An event file is a sequence of TFRecords (uint64 length, masked CRC32C of the length, payload,
masked CRC32C of the payload); each payload is an `Event` protobuf, encoded here by hand:
  Event   {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5}
  Summary {repeated Value value = 1}
  Value   {string tag = 1; float simple_value = 2}
"""
import json
import os
import socket
import struct
import time

import jax


def _crc32c_table():
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data):
  """CRC-32C (Castagnoli) of bytes."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus 0xa282ead8."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload):
  """One TFRecord frame around `payload` bytes."""
  length = struct.pack('<Q', len(payload))
  return (length + struct.pack('<I', masked_crc32c(length)) + payload
          + struct.pack('<I', masked_crc32c(payload)))


def _varint(n):
  out = bytearray()
  n &= (1 << 64) - 1  # int64 as protobuf encodes it
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _length_delimited(field, payload):
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time, step=0, scalars=None, file_version=None):
  """Serializes an `Event` with a file version or a `Summary` of scalar `Value`s."""
  out = b'\x09' + struct.pack('<d', wall_time) + b'\x10' + _varint(int(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b''.join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + b'\x15'
                          + struct.pack('<f', value))
        for tag, value in scalars.items())
    out += _length_delimited(5, values)
  return out


class SummaryWriter:
  """Appends scalars to `workdir/log.jsonl` and a TensorBoard event file; no-op off process 0."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, 'log.jsonl')
    self.events_path = os.path.join(
        workdir, f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}')
    self._events = open(self.events_path, 'ab')
    self._events.write(tfrecord(event_bytes(time.time(), file_version='brain.Event:2')))
    self._jsonl = open(self.jsonl_path, 'a')

  def scalars(self, step, values):
    """Writes one JSON line {'step': step, **values} and one TensorBoard event."""
    if not self.active:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    self._events.write(tfrecord(event_bytes(time.time(), step, values)))
    self._events.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._events.close()
