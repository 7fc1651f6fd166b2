/**
 * A Map that counts its changes: a reply built from a store's entries (the service list phones poll) can be kept
 * while `revision` is the same, and is never served after a change, however the entries changed.
 */
export class RevisedMap<K, V> extends Map<K, V> {
  private changes = 0;

  /** Changes on every set, delete and clear; never repeats. */
  get revision(): number {
    return this.changes;
  }

  override set(key: K, value: V): this {
    this.changes++;
    return super.set(key, value);
  }

  override delete(key: K): boolean {
    this.changes++;
    return super.delete(key);
  }

  override clear(): void {
    this.changes++;
    super.clear();
  }
}
