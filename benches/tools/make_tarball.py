"""A nightly tarball for the replay benchmark: the alert files given, each
repeated COPIES times under a name of its own, gzip at its default level (as
ZTF's ztf_public_YYYYMMDD.tar.gz). Usage: make_tarball.py OUT COPIES FILE..."""
import io
import sys
import tarfile

out, copies, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
alerts = [open(f, "rb").read() for f in files]
night = out.rsplit("/", 1)[-1].split(".")[0]
with tarfile.open(out, "w:gz") as t:
    for c in range(copies):
        for i, a in enumerate(alerts):
            info = tarfile.TarInfo(f"{night}/{c:05d}{i:03d}.avro")
            info.size = len(a)
            t.addfile(info, io.BytesIO(a))
