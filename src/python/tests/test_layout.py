"""Layouts and regions, without an agent."""

import fcntl
import unittest

from nccl_swap import Layout, LayoutError, Tensor, WeightRegion

from . import synthetic


class LayoutTest(unittest.TestCase):
    def test_packing_aligns_every_tensor_in_name_order(self):
        layout = Layout.packed([("c", "U8", [300]), ("a", "F32", [10]), ("b", "F16", [129])])
        self.assertEqual([(t.name, t.offset, t.nbytes) for t in layout], [("a", 0, 40), ("b", 256, 258), ("c", 768, 300)])
        self.assertEqual(layout.length, 1068)
        self.assertEqual(layout.to_json()[1], {"name": "b", "dtype": "F16", "shape": [129], "offset": 256})

    def test_every_rule_is_checked_naming_the_tensor(self):
        for tensors, message in [
            ([("a", "F33", [1])], "tensor 'a': unknown dtype 'F33'"),
            ([("a", "F32", [2, -1])], "tensor 'a': shape"),
            ([("a", "F4", [3])], "do not fill whole bytes"),
            ([("a", "F32", [1]), ("a", "F32", [1])], "tensor 'a' appears twice"),
        ]:
            with self.assertRaisesRegex(LayoutError, message):
                Layout.packed(tensors)
        with self.assertRaisesRegex(LayoutError, "tensor 'b' at offset 8 overlaps tensor 'a'"):
            Layout([Tensor("a", "F32", (3,), 0, 12), Tensor("b", "F32", (1,), 8, 4)])

    def test_a_region_is_a_sealed_memfd_whose_tensors_are_views_of_it(self):
        layout = synthetic.layout()
        with WeightRegion("slot0", layout) as region:
            seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
            self.assertTrue(seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW)
            synthetic.fill(region, 7)
            self.assertTrue(synthetic.holds(region, 7))
            self.assertFalse(synthetic.holds(region, 8))
            name = layout.tensors[3].name
            self.assertEqual(bytes(region.view[layout[name].offset:][:16]), synthetic.data(7, name, 16))


if __name__ == "__main__":
    unittest.main()
