"""The ctypes layout against the C header, compiled: every field's offset and size, every struct's size."""

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import unittest

from nccl_swap import abi

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "..", "native", "include", "nccl_swap_abi.h")


def native_layout():
    with open(HEADER) as f:
        text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    structs = {m.group(1): re.findall(r"^\s*(?:u?int\d+_t|char|float|double)\s+(\w+)(?:\[[^\]]+\])?;", m.group(2), flags=re.M)
               for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} \1;", text, flags=re.S)}
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{os.path.abspath(HEADER)}"', "int main(void) {"]
    for name, fields in structs.items():
        lines.append(f'  printf("{name} %zu\\n", sizeof({name}));')
        for field in fields:
            lines.append(f'  printf("{name}.{field} %zu %zu\\n", offsetof({name}, {field}), sizeof((({name}*)0)->{field}));')
    lines.append("  return 0;\n}")
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "layout.c"), os.path.join(folder, "layout")
        with open(source, "w") as f:
            f.write("\n".join(lines))
        subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-o", binary, source], check=True)
        output = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    layout = {}
    for line in output.split("\n"):
        if not line:
            continue
        parts = line.split(" ")
        layout[parts[0]] = tuple(int(p) for p in parts[1:])
    return structs, layout


@unittest.skipIf(shutil.which("gcc") is None, "needs gcc to compile the ABI header")
class AbiLayoutTest(unittest.TestCase):
    def test_every_struct_matches_the_header_byte_for_byte(self):
        structs, layout = native_layout()
        self.assertEqual(sorted(structs), sorted(abi.STRUCTS))
        for name, cls in abi.STRUCTS.items():
            self.assertEqual(layout[name], (ctypes.sizeof(cls),), name)
            mine = [f[0] for f in cls._fields_]
            self.assertEqual(mine, structs[name], f"{name}: the fields differ from the header's")
            for field in mine:
                descriptor = getattr(cls, field)
                self.assertEqual(layout[f"{name}.{field}"], (descriptor.offset, descriptor.size), f"{name}.{field}")

    def test_constants_match_the_header(self):
        with open(HEADER) as f:
            text = f.read()
        self.assertIn(f"#define NCCL_SWAP_ABI_VERSION {abi.ABI_VERSION}u", text)
        self.assertIn(f"#define NCCL_SWAP_TABLE_MAGIC 0x{abi.TABLE_MAGIC:016X}ull", text)
        self.assertIn(f"#define NCCL_SWAP_RING_MAGIC 0x{abi.RING_MAGIC:016X}ull", text)
        self.assertIn(f"#define NCCL_SWAP_REQUEST_MAGIC 0x{abi.REQUEST_MAGIC:08X}u", text)
        for kind in abi.RequestKind:
            self.assertIn(f"NCCL_SWAP_REQ_{kind.name} = {kind.value},", text)
        for status in abi.Status:
            self.assertIn(f"NCCL_SWAP_{status.name} = {status.value},", text)
        self.assertIn(f"#define NCCL_SWAP_PUBLISH_WAIT 0x{abi.PUBLISH_WAIT:x}u", text)


if __name__ == "__main__":
    unittest.main()
