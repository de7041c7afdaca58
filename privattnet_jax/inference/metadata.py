"""What a photo carries besides its pixels, found for the report and cut out of copied JPEGs.

EXIF (GPS position, device, owner, timestamps), XMP, IPTC, ICC profiles and comments; they are
cut out of JPEGs copied unchanged.
"""

from __future__ import annotations

from PIL import Image, IptcImagePlugin

from privattnet_jax.inference import preprocessing

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DEVICE_TAGS = {
  0x010F: "make",
  0x0110: "model",
  0x0131: "software",
  0xA431: "body_serial_number",
  0xA434: "lens_model",
  0xA435: "lens_serial_number",
}


_OWNER_TAGS = {
  0x013B: "artist",
  0x8298: "copyright",
  0xA430: "camera_owner_name",
  0x9C9D: "xp_author",
}


_TIME_TAGS = {0x0132: "date_time", 0x9003: "date_time_original", 0x9004: "date_time_digitized"}
ORIENTATION = 0x0112


# TIFF baseline tags that describe the image data itself (size, samples, compression, strips, tiles,
# resolution, predictor, colour map...): a TIFF always has some, and they say nothing of its owner.
_TIFF_STRUCTURE = frozenset(
  {
    0x00FE,
    0x00FF,
    0x0100,
    0x0101,
    0x0102,
    0x0103,
    0x0106,
    0x0107,
    0x0108,
    0x0109,
    0x010A,
    0x0111,
    0x0112,
    0x0115,
    0x0116,
    0x0117,
    0x0118,
    0x0119,
    0x011A,
    0x011B,
    0x011C,
    0x0128,
    0x013D,
    0x0140,
    0x0142,
    0x0143,
    0x0144,
    0x0145,
    0x0152,
    0x0153,
    0x0154,
    0x0155,
  }
)


# JPEG markers a byte-for-byte copy keeps: APP0 (JFIF) and APP14 (Adobe: the colour transform).
_JPEG_KEPT_APP = (0xE0, 0xEE)


def _rational(value) -> float:
  return float(value[0]) / float(value[1]) if isinstance(value, tuple) else float(value)


def _gps_position(gps) -> dict:
  """Latitude / longitude (degrees, signed) and altitude (m) of a GPS IFD, where present."""
  position = {}
  for key, ref_tag, tag, negative in (("latitude", 1, 2, "S"), ("longitude", 3, 4, "W")):
    if tag in gps:
      try:
        degrees, minutes, seconds = (_rational(v) for v in gps[tag])
        value = degrees + minutes / 60 + seconds / 3600
        ref = gps.get(ref_tag, "")
        ref = ref.decode("ascii", "replace") if isinstance(ref, bytes) else str(ref)
        position[key] = round(-value if ref.strip().upper() == negative else value, 7)
      except (TypeError, ValueError, ZeroDivisionError):
        position[key] = "unreadable"
  if 6 in gps:
    try:
      position["altitude"] = round(_rational(gps[6]) * (-1 if gps.get(5) in (1, b"\x01") else 1), 2)
    except (TypeError, ValueError, ZeroDivisionError):
      position["altitude"] = "unreadable"
  return position


def _text(value) -> str:
  if isinstance(value, bytes):
    value = value.decode("utf-16-le" if value[1:2] == b"\x00" else "utf-8", "replace")
  return str(value).strip("\x00 ").strip()


def find_metadata(image: Image.Image) -> dict:
  """What an opened image carries beside its pixels: {kind: details}, empty for a clean file.

  Kinds: gps (the position), device (make, model, serial numbers, software), owner (artist,
  copyright, owner name), timestamps, exif (tag count), xmp, iptc, icc_profile, comment, text.
  """
  found: dict = {}
  try:
    exif = image.getexif()
  except Exception:  # pylint: disable=broad-except  # A broken EXIF block is still EXIF.
    exif, found["exif"] = None, {"tags": "unreadable"}
  if exif:
    # A TIFF's own image tags (size, compression, strips) come back as EXIF too: not metadata.
    tags = [tag for tag in exif if image.format != "TIFF" or tag not in _TIFF_STRUCTURE]
    if tags:
      found["exif"] = {"tags": len(tags)}
    ifds = {0: exif}
    for ifd in (_EXIF_IFD, _GPS_IFD):
      try:
        ifds[ifd] = exif.get_ifd(ifd)
      except Exception:  # pylint: disable=broad-except
        ifds[ifd] = {}
    merged = {**ifds[_EXIF_IFD], **exif}
    if ifds[_GPS_IFD]:
      found["gps"] = _gps_position(ifds[_GPS_IFD]) or {"tags": len(ifds[_GPS_IFD])}
    for kind, tags in (
      ("device", _DEVICE_TAGS),
      ("owner", _OWNER_TAGS),
      ("timestamps", _TIME_TAGS),
    ):
      values = {
        name: _text(merged[tag])
        for tag, name in tags.items()
        if tag in merged and _text(merged[tag])
      }
      if values:
        found[kind] = values
  info = image.info
  xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
  if xmp:
    found["xmp"] = {"bytes": len(xmp)}
  try:
    iptc = IptcImagePlugin.getiptcinfo(image)
  except Exception:  # pylint: disable=broad-except
    iptc = {"unreadable": True}
  if iptc:
    found["iptc"] = {"fields": len(iptc)}
  if info.get("icc_profile"):
    found["icc_profile"] = {"bytes": len(info["icc_profile"])}
  if (
    image.format == "MPO" and preprocessing.frame_count(image) > 1
  ):  # A depth map, gain map, 2nd view.
    found["extra_images"] = {"count": preprocessing.frame_count(image) - 1}
  if info.get("comment"):
    found["comment"] = _text(info["comment"])[:200]
  text = getattr(image, "text", None) if image.format == "PNG" else None
  if text:
    found["text"] = sorted(text)
  return found


def strip_jpeg_metadata(data: bytes) -> bytes:
  """A JPEG's bytes without its APP1..APP15 (EXIF, XMP, ICC, IPTC...) and COM segments.

  The entropy-coded image is copied as is (no re-encoding); APP0 (JFIF) and APP14 (Adobe, which
  says how to read the colours) stay. Raises ValueError on a malformed segment list.
  """
  if data[:2] != b"\xff\xd8":
    raise ValueError("not a JPEG")
  out, position = bytearray(data[:2]), 2
  while position + 4 <= len(data):
    if data[position] != 0xFF:
      raise ValueError("malformed JPEG segment list")
    marker = data[position + 1]
    if marker == 0xFF:  # Fill byte.
      position += 1
      continue
    length = int.from_bytes(data[position + 2 : position + 4], "big")
    end = position + 2 + length
    if marker == 0xDA:  # Start of scan: the rest is image data.
      out += data[position:]
      return bytes(out)
    if end > len(data) or length < 2:
      raise ValueError("truncated JPEG segment")
    if not ((0xE1 <= marker <= 0xEF and marker not in _JPEG_KEPT_APP) or marker == 0xFE):
      out += data[position:end]
    position = end
  raise ValueError("JPEG without image data")
