import path from 'node:path';
import type { VmSynthesis } from '../core/adapters';
import type { Logger } from '../log';
import { expandedBytes, openOverlay } from '../synthesis/apply';
import { trustedOverlayKeys } from '../synthesis/keys';
import { OVERLAY_LIMITS } from '../synthesis/overlay-format';
import { synthesisService, synthesizedFiles, type SynthesisMechanism } from './synthesis';

/**
 * VM Synthesis as the core drives it: overlays read and checked by synthesis/ (signed by a key in
 * `<dataDir>/overlay-keys`, read at every synthesis), launched by the synthesis mechanism.
 */
export function vmSynthesis(mechanism: SynthesisMechanism, dataDir: string, log: Logger): VmSynthesis {
  return {
    mechanism,
    maxOverlayBytes: OVERLAY_LIMITS.overlayBytes,
    async open(stream, bytes, baseOf, keep, arrived) {
      const overlay = await openOverlay(stream, bytes, await trustedOverlayKeys(path.join(dataDir, 'overlay-keys'), log));
      const close = () => overlay.reader.close();
      try {
        return { service: synthesisService(overlay, baseOf(overlay.manifest.base), keep, arrived), expandedBytes: expandedBytes(overlay.manifest), close };
      } catch (err) {
        await close();
        throw err;
      }
    },
    synthesizedFiles,
  };
}
