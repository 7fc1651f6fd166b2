/**
 * Ranking cloudlets the way SEI's client-lib does by default (CpuBasedRanker): 100 × max_cores − CPU usage, read from
 * each cloudlet's KD `/api/system`. A rank ≤ 0 is never chosen, as in client-lib (its best rank starts at 0).
 */
export interface KdSystemInfo {
  cpu_info: { max_cores: number; usage: number; speed: string; cache: number };
  memory_info: { max_memory: number; free_memory: number };
}

export function cpuBasedRank(system: KdSystemInfo): number {
  return 100 * system.cpu_info.max_cores - system.cpu_info.usage;
}

export interface Ranked<T> {
  cloudlet: T;
  /** null when the cloudlet did not answer /api/system. */
  rank: number | null;
  /** Whether client-lib would pick it at all. */
  eligible: boolean;
  error?: string;
}

/** Asks every cloudlet at once; best first, then the ineligible ones (unreachable last). */
export async function rankCloudlets<T>(cloudlets: T[], systemOf: (cloudlet: T) => Promise<KdSystemInfo>): Promise<Ranked<T>[]> {
  const ranked = await Promise.all(
    cloudlets.map(async (cloudlet): Promise<Ranked<T>> => {
      try {
        const rank = Math.round(cpuBasedRank(await systemOf(cloudlet)) * 100) / 100;
        // A cloudlet's figures are its own claims: one that gives no numbers is not ranked at all.
        if (!Number.isFinite(rank)) throw new Error('its /api/system gave no CPU figures');
        return { cloudlet, rank, eligible: rank > 0 };
      } catch (err) {
        return { cloudlet, rank: null, eligible: false, error: (err as Error).message };
      }
    }),
  );
  return ranked.sort((a, b) => (b.rank ?? -Infinity) - (a.rank ?? -Infinity));
}
