"""Re-zip a wheel uncompressed (for solid xz), dropping files not needed at runtime and stripping big ELF files."""
import os, subprocess, sys, tempfile, zipfile
DROP = ("ray/jars/", "litellm/proxy/_experimental/out/")
src, dst = sys.argv[1], sys.argv[2]
import base64, hashlib, csv, io
dropped = stripped = 0
record_name = None
hashes = {}
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
    for info in zi.infolist():
        if info.filename.endswith(".dist-info/RECORD"):
            record_name, record_info = info.filename, info
            continue
        n = info.filename
        if n.startswith(DROP) or (n.startswith("ray/dashboard/client/build/") and n.endswith(".map")):
            dropped += info.file_size
            continue
        data = zi.read(info)
        if len(data) > 1_000_000 and data[:4] == b"\x7fELF":
            with tempfile.NamedTemporaryFile(delete=False) as t:
                t.write(data)
            subprocess.run(["strip", "--strip-unneeded", t.name], check=True)
            new = open(t.name, "rb").read(); os.unlink(t.name)
            stripped += len(data) - len(new); data = new
        ni = zipfile.ZipInfo(n, info.date_time)
        ni.external_attr = info.external_attr
        zo.writestr(ni, data, zipfile.ZIP_STORED)
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        hashes[n] = (f"sha256={h}", str(len(data)))
    out = io.StringIO(); w = csv.writer(out, lineterminator="\n")
    for n, (h, size) in hashes.items():
        w.writerow([n, h, size])
    w.writerow([record_name, "", ""])
    ni = zipfile.ZipInfo(record_name, record_info.date_time); ni.external_attr = record_info.external_attr
    zo.writestr(ni, out.getvalue().encode(), zipfile.ZIP_STORED)
print(os.path.basename(src), "dropped", dropped, "stripped", stripped)
