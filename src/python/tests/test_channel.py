"""The version table and ring, on files laid out as the agent lays them out."""

import ctypes
import os
import random
import struct
import tempfile
import unittest

from nccl_swap import SharedRing, VersionTable, abi, pack_state, unpack_state


def make_table(path, capacity):
    header = abi.VersionTableHeader(magic=abi.TABLE_MAGIC, abi_version=abi.ABI_VERSION, capacity=capacity)
    with open(path, "wb") as f:
        f.write(bytes(header) + bytes(ctypes.sizeof(abi.VersionEntry) * capacity))


def make_ring(path, capacity, entry_bytes):
    header = abi.RingHeader(magic=abi.RING_MAGIC, abi_version=abi.ABI_VERSION, capacity=capacity, entry_bytes=entry_bytes)
    with open(path, "wb") as f:
        f.write(bytes(header) + bytes(capacity * entry_bytes))


class ChannelTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.folder.cleanup()

    def path(self, name):
        return os.path.join(self.folder.name, name)

    def test_state_packs_version_and_slot_into_one_word(self):
        for version, slot in [(1, 0), (7, 1), ((1 << 56) - 1, 1)]:
            self.assertEqual(unpack_state(pack_state(version, slot)), (version, slot))
            self.assertEqual(pack_state(version, slot) & 1, 1)
        with self.assertRaises(ValueError):
            pack_state(1 << 56, 0)
        with self.assertRaises(ValueError):
            pack_state(1, 2)

    def test_the_table_shows_what_is_written_into_a_row(self):
        path = self.path("table")
        make_table(path, 4)
        with open(path, "r+b") as f:
            offset = ctypes.sizeof(abi.VersionTableHeader) + 2 * ctypes.sizeof(abi.VersionEntry)
            f.seek(offset)
            f.write(struct.pack("<QQQQI", pack_state(42, 1), 41, 0xABC, 0, abi.ENTRY_IN_USE) + bytes(4) + b"llama")
        with VersionTable(path) as table:
            self.assertEqual(table.find("llama"), 2)
            self.assertEqual(table.find("other"), -1)
            self.assertEqual(unpack_state(table.state(2)), (42, 1))
            self.assertEqual(table.entry(2).last_good, 41)
            with self.assertRaises(IndexError):
                table.entry(4)

    def test_files_that_are_not_tables_or_rings_are_refused_by_name(self):
        junk = self.path("junk")
        with open(junk, "wb") as f:
            f.write(random.Random(1).randbytes(4096))
        with self.assertRaisesRegex(ValueError, "not an nccl-swap version table"):
            VersionTable(junk)
        with self.assertRaisesRegex(ValueError, "not an nccl-swap ring"):
            SharedRing(junk)

    def test_a_ring_keeps_order_through_wraps_and_refuses_when_full(self):
        path = self.path("ring")
        make_ring(path, 4, 16)
        generator = random.Random(3)
        with SharedRing(path) as producer, SharedRing(path) as consumer:
            sent = []
            for _ in range(10):
                for _ in range(3):
                    entry = generator.randbytes(16)
                    self.assertTrue(producer.try_write(entry))
                    sent.append(entry)
                received = [consumer.try_read() for _ in range(3)]
                self.assertEqual(received, sent[-3:])
            self.assertIsNone(consumer.try_read())
            for _ in range(4):
                self.assertTrue(producer.try_write(bytes(16)))
            self.assertFalse(producer.try_write(bytes(16)))
            self.assertFalse(producer.write(bytes(16), timeout=0.05))
            with self.assertRaises(ValueError):
                producer.try_write(bytes(8))


if __name__ == "__main__":
    unittest.main()
