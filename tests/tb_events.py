"""Reads TensorBoard event files back with protobuf and an independent CRC-32C (no TensorFlow)."""
import struct

from etils import epath


def crc32c_bitwise(data):
  """CRC-32C (Castagnoli), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def _event_class():
  """tensorflow/core/util/event.proto and summary.proto (the fields used here), built at run time."""
  # pylint: disable-next=g-import-not-at-top
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  f = descriptor_pb2.FileDescriptorProto(name='event_test.proto', package='t')
  image = f.message_type.add(name='Image')
  image.field.add(name='height', number=1, type=5, label=1)
  image.field.add(name='width', number=2, type=5, label=1)
  image.field.add(name='colorspace', number=3, type=5, label=1)
  image.field.add(name='encoded_image_string', number=4, type=12, label=1)
  value = f.message_type.add(name='Value')
  value.field.add(name='tag', number=1, type=9, label=1)
  value.field.add(name='simple_value', number=2, type=2, label=1)
  value.field.add(name='image', number=4, type=11, label=1, type_name='.t.Image')
  summ = f.message_type.add(name='Summary')
  summ.field.add(name='value', number=1, type=11, label=3, type_name='.t.Value')
  event = f.message_type.add(name='Event')
  event.field.add(name='wall_time', number=1, type=1, label=1)
  event.field.add(name='step', number=2, type=3, label=1)
  event.field.add(name='file_version', number=3, type=9, label=1)
  event.field.add(name='summary', number=5, type=11, label=1, type_name='.t.Summary')
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('t.Event'))


def read_events(logdir):
  """The Event messages of the one event file in `logdir`, every record's two CRCs checked."""
  (path,) = epath.Path(logdir).glob('events.out.tfevents.*')
  data = path.read_bytes()
  mask = lambda c: (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  events, pos, event_class = [], 0, _event_class()
  while pos < len(data):
    (length,) = struct.unpack_from('<Q', data, pos)
    (length_crc,) = struct.unpack_from('<I', data, pos + 8)
    assert length_crc == mask(crc32c_bitwise(data[pos:pos + 8]))
    payload = data[pos + 12:pos + 12 + length]
    assert struct.unpack_from('<I', data, pos + 12 + length)[0] == mask(crc32c_bitwise(payload))
    events.append(event_class.FromString(payload))
    pos += 16 + length
  return events
