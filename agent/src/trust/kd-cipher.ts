/**
 * KD-Cloudlet's legacy message cipher, as SEI's client-lib (AESEncrypter) speaks it on POST /api/command:
 * base64( IV[16] || AES-256-CBC( PKCS#7-padded message ) ), key = SHA-256(the device's password). It has no MAC and
 * no replay protection; it is kept only for KD clients in the field (docs/security.md, "Legacy encrypted KD API").
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';

const IV_BYTES = 16;
const BLOCK_BYTES = 16;

function keyOf(password: string): Buffer {
  return createHash('sha256').update(password, 'utf8').digest();
}

/** Encrypts `message` under a fresh random IV; the base64 text is what goes on the wire. */
export function kdEncrypt(message: Buffer, password: string): string {
  const iv = randomBytes(IV_BYTES);
  const cipher = createCipheriv('aes-256-cbc', keyOf(password), iv);
  return Buffer.concat([iv, cipher.update(message), cipher.final()]).toString('base64');
}

/**
 * Decrypts a base64 message; null when it is not one (bad base64, wrong length, bad padding), without saying which:
 * with no MAC, telling bad padding apart from anything else is a padding oracle that decrypts any captured command.
 * A wrong key usually fails the padding check, but not always: the caller must treat the plaintext as untrusted text
 * and answer what does not parse exactly as it answers null.
 */
export function kdDecrypt(text: string, password: string): Buffer | null {
  // A form decoder turns an unencoded '+' into a space; base64 has no spaces, so they are put back.
  const compact = text.trim().replace(/ /g, '+');
  if (!/^[A-Za-z0-9+/\r\n]+={0,2}$/.test(compact)) return null;
  const raw = Buffer.from(compact, 'base64');
  if (raw.length < IV_BYTES + BLOCK_BYTES || (raw.length - IV_BYTES) % BLOCK_BYTES !== 0) return null;
  const decipher = createDecipheriv('aes-256-cbc', keyOf(password), raw.subarray(0, IV_BYTES));
  try {
    return Buffer.concat([decipher.update(raw.subarray(IV_BYTES)), decipher.final()]);
  } catch {
    return null;
  }
}
