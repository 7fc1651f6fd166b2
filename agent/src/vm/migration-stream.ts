/**
 * Where the RAM pages are in a libvirt save image: its payload is QEMU's migration stream, in which each non-zero
 * guest page is a record `be64 (addr | RAM_SAVE_FLAG_PAGE) [u8 len, idstr] <4096 bytes>` of the "ram" section. Those
 * 4096-byte payloads are guest pages, 4 KiB-aligned in the guest, so they are what deduplicates against disk blocks
 * and base pages. Only the RAM section is walked (setup, iterations, end); device sections after it stay opaque.
 * Format: QEMU migration/ram.c and migration/savevm.c, file version 3, as QEMU 7.2 (Debian 12) and QEMU 10.0
 * (Debian 13) write it. A stream of another file version, or whose RAM section has
 * records this walker does not know (compressed, XBZRLE, multifd or mapped-ram pages), is not walked at all: the
 * caller then deduplicates fixed 4 KiB blocks of the file, which stays correct, only coarser.
 */
const FLAG_ZERO = 0x02;
const FLAG_MEM_SIZE = 0x04;
const FLAG_PAGE = 0x08;
const FLAG_EOS = 0x10;
const FLAG_CONTINUE = 0x20;
const FLAG_MASK = 0xfff;
const PAGE = 4096;
const STREAM_MAGIC = 'QEVM';
/** QEMU_VM_FILE_VERSION since QEMU 1.x; version 2 streams have no configuration section and other records. */
const STREAM_VERSION = 3;
const SECTION_PART = 0x02;
const SECTION_END = 0x03;
const SECTION_FOOTER = 0x7e;
/** QEMU_VM_SECTION_START (0x01), be32 section id, then this: idstr "ram", instance 0, version 4. */
const RAM_SECTION = Buffer.from('\x03ram\x00\x00\x00\x00\x00\x00\x00\x04', 'latin1');
/** The RAM section starts right after the small configuration section. */
const RAM_SECTION_SEARCH_BYTES = 64 << 10;

export interface RamPage {
  /** Where the page's 4096 bytes are in the file. */
  offset: number;
  /** RAM block and offset in it: the page's identity in the guest. */
  guestAddress: string;
}

/**
 * The page payloads of the save image `image` whose migration stream starts at `streamOffset`, in stream order;
 * null when the stream is not one this parser knows (then the caller falls back to fixed blocks).
 */
export function findRamPages(image: Buffer, streamOffset: number): RamPage[] | null {
  try {
    return walkRam(image, streamOffset);
  } catch {
    return null;
  }
}

function walkRam(image: Buffer, streamOffset: number): RamPage[] | null {
  if (image.toString('latin1', streamOffset, streamOffset + 4) !== STREAM_MAGIC) return null;
  if (image.readUInt32BE(streamOffset + 4) !== STREAM_VERSION) return null;
  const found = image.indexOf(RAM_SECTION, streamOffset);
  if (found < 5 || found - streamOffset > RAM_SECTION_SEARCH_BYTES || image[found - 5] !== 0x01) return null;
  const sectionId = image.readUInt32BE(found - 4);
  let at = found + RAM_SECTION.length;
  const be64 = () => {
    const value = image.readBigUInt64BE(at);
    at += 8;
    return value;
  };
  // Setup: total RAM | MEM_SIZE, then each RAM block: idstr and used length, summing to the total.
  const total = be64();
  if ((Number(total & BigInt(FLAG_MASK)) & FLAG_MEM_SIZE) === 0) return null;
  let remaining = total & ~BigInt(FLAG_MASK);
  while (remaining > 0n) {
    at += 1 + image[at]!;
    remaining -= be64();
  }
  if (remaining !== 0n) return null;
  const pages: RamPage[] = [];
  let block = '';
  for (;;) {
    const word = be64();
    const flags = Number(word & BigInt(FLAG_MASK));
    if (flags & FLAG_EOS) {
      if (image[at] === SECTION_FOOTER) at += 5;
      const next = image[at];
      // Another part of the RAM section (an iteration, or its end) follows; anything else ends the RAM walk.
      if ((next === SECTION_PART || next === SECTION_END) && image.readUInt32BE(at + 1) === sectionId) {
        at += 5;
        continue;
      }
      return pages;
    }
    if (!(flags & FLAG_CONTINUE)) {
      block = image.toString('latin1', at + 1, at + 1 + image[at]!);
      at += 1 + image[at]!;
    }
    if (flags & FLAG_ZERO) {
      at += 1;
    } else if (flags & FLAG_PAGE) {
      if (at + PAGE > image.length) return null;
      pages.push({ offset: at, guestAddress: `${block}@${word & ~BigInt(FLAG_MASK)}` });
      at += PAGE;
    } else {
      return null; // compressed or XBZRLE pages: not in a plain save
    }
  }
}
